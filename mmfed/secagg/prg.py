"""Mask expansion: a 32-byte seed becomes a pseudorandom uint32 vector.

ChaCha20's keystream (the encryption of zeros) is a standard PRG with a 256-bit seed and
runs in native code, so masking a million coordinates costs milliseconds. The nonce is
fixed per purpose rather than random because both ends of a pairwise mask must derive
the same stream from the same seed; distinct purposes get distinct nonces so a seed
accidentally used for two purposes still yields unrelated streams. Bytes are read as
little-endian so every platform expands a seed to the same vector.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from mmfed.secagg.errors import SecAggError
from mmfed.secagg.quantize import U32Array

SEED_BYTES = 32
PURPOSES = ("self-mask", "pair-mask", "graph")


def _nonce(purpose: str) -> bytes:
    if purpose not in PURPOSES:
        raise SecAggError(f"unknown PRG purpose {purpose!r}; expected one of {PURPOSES}")
    # cryptography's ChaCha20 takes a 16-byte value: 4-byte block counter, 12-byte nonce.
    tag = hashlib.sha256(b"mmfed-secagg/v1 prg nonce " + purpose.encode()).digest()
    return bytes(4) + tag[:12]


def expand(seed: bytes, length: int, purpose: str) -> U32Array:
    """``length`` uint32 words of ChaCha20 keystream under ``seed`` (read-only array)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise SecAggError(f"a PRG seed must be {SEED_BYTES} bytes")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise SecAggError(f"PRG length must be a non-negative integer, got {length!r}")
    encryptor = Cipher(algorithms.ChaCha20(bytes(seed), _nonce(purpose)), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
