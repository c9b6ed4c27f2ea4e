"""DP-SGD vs non-private training of the default model: per-step time and peak memory.

One process, one run: the same model, data and batch size (64) are trained both ways,
each for warm-up steps and then at least 20 timed steps; the figures are medians.
Peak memory is the peak of the allocator on CUDA, and on the CPU the peak of bytes
allocated through malloc above the level just before the timed steps (sampled every
millisecond), i.e. what one training step needs beyond the model and data.

Prints one JSON object as its last line, e.g.
{"time_ratio": 2.1, "memory_ratio": 1.3, "device": "cpu", ...}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from mmfed.data import load_site
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.features import encode, local_stats, merge_stats
from mmfed.model import build_model
from mmfed.training import TrainSpec, make_loss, make_optimizer, tensor_dataset


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
    """Peak memory above the level at entry (CUDA allocator, or sampled RSS)."""

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


def timed_steps(step, n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default="ghost", choices=("ghost", "hooks"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "fed", SynthSettings(sites=1, patients_per_site=600, seed=0))
        site = load_site(Path(tmp) / "fed" / "site-1")
    schema = merge_stats([local_stats(site)])
    enc = encode(site, schema)
    data = tensor_dataset(enc)
    spec = TrainSpec(batch_size=args.batch_size)
    bs = args.batch_size
    batches = [tuple(t[i:i + bs].to(device) for t in data.tensors)
               for i in range(0, len(enc) - bs + 1, bs)]

    def plain_phase() -> tuple[list[float], int]:
        model = build_model(schema, seed=0).to(device)
        opt = make_optimizer(model, spec)
        loss_fn = make_loss(enc.labels, 2, spec).to(device)
        it = iter(range(10**9))

        def step() -> None:
            *x, y = batches[next(it) % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*x), y).backward()
            opt.step()

        timed_steps(step, args.warmup, device)
        with PeakMemory(device) as mem:
            times = timed_steps(step, args.steps, device)
        return times, mem.peak

    def dp_phase() -> tuple[list[float], int]:
        from opacus import PrivacyEngine

        model = build_model(schema, seed=0).to(device)
        opt = make_optimizer(model, spec)
        loss_fn = make_loss(enc.labels, 2, spec).to(device)
        loader = torch.utils.data.DataLoader(data, batch_size=bs)
        engine = PrivacyEngine()
        kwargs = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=args.mode)
        if args.mode == "ghost":
            pmodel, popt, pcrit, _ = engine.make_private(criterion=loss_fn, **kwargs)
        else:
            pmodel, popt, _ = engine.make_private(**kwargs)
            pcrit = loss_fn
        it = iter(range(10**9))

        def step() -> None:
            *x, y = batches[next(it) % len(batches)]
            popt.zero_grad(set_to_none=True)
            pcrit(pmodel(*x), y).backward()
            popt.step()

        timed_steps(step, args.warmup, device)
        with PeakMemory(device) as mem:
            times = timed_steps(step, args.steps, device)
        return times, mem.peak

    import warnings

    warnings.filterwarnings("ignore")
    plain_t, plain_m = plain_phase()
    dp_t, dp_m = dp_phase()
    result = {
        "time_ratio": round(statistics.median(dp_t) / statistics.median(plain_t), 3),
        "memory_ratio": round(max(dp_m, 1) / max(plain_m, 1), 3),
        "device": device.type,
        "batch_size": bs,
        "grad_sample_mode": args.mode,
        "median_step_ms": {"plain": round(1000 * statistics.median(plain_t), 2),
                           "dp": round(1000 * statistics.median(dp_t), 2)},
        "peak_memory_mb": {"plain": round(plain_m / 2**20, 2), "dp": round(dp_m / 2**20, 2)},
        "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
