"""Which torch device a site, the server or the centralized reference trains on.

``train.device`` is a request: ``auto`` takes the first CUDA GPU when torch sees
one and the CPU otherwise, so the same config runs on a laptop, in CI and on a GPU
node. An explicit accelerator that is not there is refused up front with one line,
instead of a CUDA error from deep inside the first training step.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from mmfed.errors import ConfigError

if TYPE_CHECKING:
    import torch

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def resolve_device(spec: str) -> torch.device:
    """The torch device for a ``train.device`` value (auto, cpu, cuda, cuda:N, mps)."""
    import torch

    match = _SPEC.match(spec.strip())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"train.device = {spec!r}: must be auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("train.device = 'mps' but this machine has no usable Apple "
                              "GPU (MPS); use train.device = auto or cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device = {spec!r} but torch sees no CUDA GPU here (a CPU "
                          f"build of torch, or no driver); use train.device = auto or cpu")
    count = torch.cuda.device_count()
    number = int(index or 0)
    if number >= count:
        raise ConfigError(f"train.device = {spec!r} but torch sees only {count} CUDA "
                          f"GPU(s) (cuda:0 to cuda:{count - 1})")
    return torch.device(f"cuda:{number}")


def describe(device: torch.device) -> str:
    """The device for log lines and benchmark output, with the GPU's name on CUDA."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def simulation_gpus(spec: str, gpus_per_site: float, cpu_slots: int) -> tuple[float, int]:
    """(Ray ``num_gpus`` per virtual site, GPUs Ray should know of) for a simulation.

    Training on the CPU asks Ray for no GPU at all. ``cuda:N`` pins every site to GPU
    N, so Ray is asked for none and leaves all GPUs visible to every worker. With
    ``auto`` or ``cuda`` Ray places each site on a GPU: ``gpus_per_site`` > 0 is taken
    as given (fewer sites then run at once), and 0 shares the GPUs evenly among the
    ``cpu_slots`` sites the CPUs let run at once, so the GPU never lowers concurrency.
    """
    import torch

    device = resolve_device(spec)
    if device.type != "cuda":
        return 0.0, 0
    gpus = torch.cuda.device_count()
    if ":" in spec:
        return 0.0, gpus
    if gpus_per_site > 0:
        return gpus_per_site, gpus
    share = gpus / max(cpu_slots, 1)
    return max(math.floor(share * 10_000) / 10_000, 0.0001), gpus  # Ray: 4 decimals
