"""Randomness that protects privacy: keyed from the operating system, never from a seed.

DP-SGD is private only if nobody can predict its noise or which patients each step
sampled. The run seed is chosen by the coordinator, and the round and site name are
known to it, so anything derived from them is known to it: it could subtract the
noise from a released update. Every generator here therefore takes its whole state
from ``os.urandom``:

- CPU (Mersenne Twister, what Poisson sampling always uses and the noise on the CPU):
  all 624 state words, 19,968 bits, are overwritten with OS entropy after a seed
  has given the header fields valid values. ``manual_seed`` alone would key it with
  64 bits; ``torchcsprng``, which Opacus's own secure mode wants, does not build for
  this torch.
- CUDA (Philox): its full state is a 64-bit seed and a 64-bit offset that must be a
  multiple of 4 and fit a signed integer, so 125 bits come from OS entropy, and a
  fresh key is drawn for every local training round.

Mersenne Twister is not a cryptographic generator: its state can be recovered from
624 consecutive raw outputs. No raw output leaves the site, only sums of clipped
gradients and noise, so that attack does not apply to what the server sees.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mmfed.errors import MmfedError

MT_WORDS = 624
_MT_STATE_BYTES = 5056  # torch's serialised CPU generator state
_MT_WORDS_AT = 24  # after seed (8), left (4), seeded (4), next (8)


def os_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose whole state comes from the OS's CSPRNG."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    if device.type == "cpu":
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))  # valid header fields
        state = gen.get_state().numpy().copy()
        if state.size != _MT_STATE_BYTES:
            raise MmfedError(f"torch's CPU generator state has {state.size} bytes, not "
                             f"{_MT_STATE_BYTES}; refusing to train with noise it cannot "
                             "key from the OS")
        words = np.frombuffer(os.urandom(4 * MT_WORDS), dtype=np.uint32).astype(np.uint64)
        if not words.any():  # the one state Mersenne Twister cannot leave
            words[0] = 1
        end = _MT_WORDS_AT + 8 * MT_WORDS
        state[_MT_WORDS_AT:end] = np.frombuffer(words.tobytes(), dtype=np.uint8)
        gen.set_state(torch.from_numpy(state))
        if not np.array_equal(gen.get_state().numpy()[_MT_WORDS_AT:end], state[_MT_WORDS_AT:end]):
            raise MmfedError("torch did not take the OS-drawn generator state; refusing to "
                             "train with predictable noise")
        return gen
    if device.type == "cuda":
        seed = int.from_bytes(os.urandom(8), "little")
        offset = int.from_bytes(os.urandom(8), "little") & (2**63 - 1) & ~3
        raw = seed.to_bytes(8, "little") + offset.to_bytes(8, "little")
        gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        return gen
    raise MmfedError(f"DP training on {device.type} has no OS-keyed noise generator; "
                     "train on cpu or cuda (train.device)")


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator anyone who knows ``seed`` can replay: for debugging simulations only
    (``privacy.debug_seeded_noise``), never for a release that must stay private."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
