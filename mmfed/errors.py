"""Error types that the CLI turns into one-line messages and exit codes.

Every failure a user can cause (bad data, bad config, bad arguments) is raised as an
``MmfedError`` so the command line can print it without a traceback; anything else
is a bug and is reported as such.
"""

from __future__ import annotations


class MmfedError(Exception):
    """A user-facing failure: printed as one line, exit code ``exit_code``."""

    exit_code = 1


class UsageError(MmfedError):
    """Wrong command-line usage (exit 2, like argparse)."""

    exit_code = 2


class ConfigError(MmfedError):
    """A run configuration or site policy that cannot be used."""


class DataError(MmfedError):
    """A site or federation folder that cannot be used."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class Declined(MmfedError):
    """A site's refusal under its own policy (budget spent, a request weaker than its
    terms): a normal answer to the server, not a failure, and it carries nothing
    about the site's data or update beyond the one-line reason."""
