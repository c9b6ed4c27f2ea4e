"""Secure-aggregation failures, as ``MmfedError`` so the CLI prints them as one line.

Two kinds are kept apart because the caller reacts differently: ``SecAggAborted`` means
too few sites are left to finish this round safely (skip the round, try again next time),
while a plain ``SecAggError`` means a message was malformed, tampered with or out of
order (a bug or an attack, which retrying will not fix).
"""

from __future__ import annotations

from mmfed.errors import MmfedError


class SecAggError(MmfedError):
    """A secure-aggregation message or parameter that cannot be used."""


class SecAggAborted(SecAggError):
    """Too few sites survive for the round to finish without weakening privacy."""
