"""DP-SGD vs non-private training of the default model: per-step time and peak memory.

One process, one run: the default model (``RunConfig()``'s model and optimiser) is
trained both ways on the same data with the same batch size (64), each step exactly as
a site runs it (``make_private`` and, under DP, dropout off). After warm-up the
two are timed in alternation, one plain step then one DP step, so that load from
other processes on a shared machine falls on both alike; the figures are medians of
at least 20 steps each. Peak memory is measured afterwards, one mode at a time: the
peak of the allocator on CUDA, and on the CPU the peak of bytes allocated through
malloc above the level just before the measured steps (sampled every millisecond),
i.e. what one training step needs beyond the model and data.

Prints one JSON object as its last line, e.g.
{"time_ratio": 1.3, "memory_ratio": 1.2, "device": "cpu", ...}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mmfed.config import RunConfig
from mmfed.data import load_site
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.ml.features import encode, pooled_schema
from mmfed.ml.model import build_model
from mmfed.ml.training import make_loss, make_optimizer, tensor_dataset
from mmfed.privacy.dp_sgd import NoiseSource, dropout_off, make_private

Step = Callable[[], None]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes currently allocated through malloc (torch's CPU allocator uses it)."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakMemory:
    """Peak memory above the level at entry (CUDA allocator, or sampled malloc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = heap_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, heap_bytes() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()


def timed(step: Step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) for one step.

    On a CPU shared with other jobs the wall time includes waiting for a core; the
    thread's CPU time does not, so its ratio is the steadier of the two. On CUDA only
    the wall time means anything.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.thread_time() - c0


def peak_memory(step: Step, n: int, device: torch.device) -> int:
    with PeakMemory(device) as mem:
        for _ in range(n):
            step()
    return mem.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default=None, choices=("ghost", "hooks"),
                        help="Opacus grad_sample_mode (default: the run config's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cfg = RunConfig()
    mode = args.mode or cfg["privacy.grad_sample_mode"]
    with tempfile.TemporaryDirectory() as tmp:
        # at least four distinct batches whatever the batch size
        synthesize(Path(tmp) / "fed", SynthSettings(
            sites=1, patients_per_site=max(600, 5 * args.batch_size), seed=0))
        site = load_site(Path(tmp) / "fed" / "site-1")
    schema = pooled_schema([site])
    enc = encode(site, schema)
    data = tensor_dataset(enc)
    spec = cfg.train_spec()
    bs = args.batch_size
    batches = [tuple(t[i:i + bs].to(device) for t in data.tensors)
               for i in range(0, len(enc) - bs + 1, bs)]

    def stepper(model: torch.nn.Module, opt: torch.optim.Optimizer,
                loss_fn: torch.nn.Module) -> Step:
        position = [0]

        def step() -> None:
            *x, y = batches[position[0] % len(batches)]
            position[0] += 1
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*x), y).backward()
            opt.step()

        return step

    warnings.filterwarnings("ignore")
    plain_model = build_model(schema, cfg.model_spec(), seed=0).to(device)
    plain = stepper(plain_model, make_optimizer(plain_model, spec),
                    make_loss(enc.labels, 2, spec).to(device))
    dp_model = build_model(schema, cfg.model_spec(), seed=0).to(device)
    loader = torch.utils.data.DataLoader(data, batch_size=bs)
    # The same wrapping as a site's DP training, with fixed (not Poisson) batches so
    # both modes see identical batch shapes.
    pmodel, popt, pcrit, _ = make_private(
        dp_model, loader, make_loss(enc.labels, 2, spec).to(device), spec, sigma=1.0,
        max_grad_norm=cfg["privacy.max_grad_norm"], mode=mode,
        source=NoiseSource.from_os(device), poisson=False)
    dp_step = stepper(pmodel, popt, pcrit)

    def private() -> None:
        with dropout_off(dp_model):  # as a site's DP training runs (train_private)
            dp_step()

    for _ in range(args.warmup):
        plain()
        private()
    plain_t: list[float] = []
    dp_t: list[float] = []
    plain_c: list[float] = []
    dp_c: list[float] = []
    for _ in range(args.steps):
        wall, cpu = timed(plain, device)
        plain_t.append(wall)
        plain_c.append(cpu)
        wall, cpu = timed(private, device)
        dp_t.append(wall)
        dp_c.append(cpu)
    plain_m = peak_memory(plain, 5, device)
    dp_m = peak_memory(private, 5, device)
    result = {
        "time_ratio": round(statistics.median(dp_t) / statistics.median(plain_t), 3),
        "memory_ratio": round(max(dp_m, 1) / max(plain_m, 1), 3),
        "device": device.type,
        "batch_size": bs,
        "grad_sample_mode": mode,
        "median_step_ms": {"plain": round(1000 * statistics.median(plain_t), 2),
                           "dp": round(1000 * statistics.median(dp_t), 2)},
        "min_step_ms": {"plain": round(1000 * min(plain_t), 2),
                        "dp": round(1000 * min(dp_t), 2)},
        "cpu_time_ratio": round(statistics.median(dp_c) / statistics.median(plain_c), 3),
        "median_step_cpu_ms": {"plain": round(1000 * statistics.median(plain_c), 2),
                               "dp": round(1000 * statistics.median(dp_c), 2)},
        "peak_memory_mb": {"plain": round(plain_m / 2**20, 2), "dp": round(dp_m / 2**20, 2)},
        "trainable_parameters": sum(p.numel() for p in plain_model.parameters()
                                    if p.requires_grad),
        "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
