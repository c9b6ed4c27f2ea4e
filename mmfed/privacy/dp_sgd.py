"""Local DP-SGD with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

Opacus's hook-based per-sample gradients are the default (``privacy.grad_sample_mode
= "hooks"``): the default model is small (about 12,000 parameters), so materialising
per-sample gradients costs little, while ghost clipping pays for a second backward
pass through the image encoder on every step: a DP step costs about 1.35x a plain one
on one CPU thread with hooks, against about 1.65x with ghost clipping
(``benchmarks/dp_overhead.py``). Ghost clipping stays available; when a
model has a layer it cannot handle, training falls back to hooks and says so once.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmfed.config import TrainSpec
from mmfed.ml.features import EncodedSite
from mmfed.ml.task import Task
from mmfed.ml.training import (
    as_task,
    make_loss,
    make_optimizer,
    restrict_modalities,
    tensor_dataset,
    train_epochs,
)
from mmfed.privacy.rng import os_generator, seeded_generator

log = logging.getLogger("mmfed")
_SAMPLERS_REGISTERED = False


def register_samplers() -> None:
    """Tell Opacus the exact per-sample gradient of ``ModalityBias`` (once per process).

    ``logits + bias`` has, for each patient, the output's gradient as its bias
    gradient. Without this Opacus computes it with its generic vmap fallback, which
    cost about a tenth of a DP step on the default model.
    """
    global _SAMPLERS_REGISTERED
    if _SAMPLERS_REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler

    from mmfed.ml.model import ModalityBias

    @register_grad_sampler(ModalityBias)
    def _bias_grad_sample(layer: ModalityBias, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {layer.bias: backprops.reshape(backprops.shape[0], -1, layer.bias.numel())
                .sum(dim=1)}

    @register_norm_sampler(ModalityBias)
    def _bias_norm_sample(layer: ModalityBias, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        grads = _bias_grad_sample(layer, activations, backprops)[layer.bias]
        return {layer.bias: grads.norm(dim=1)}

    _SAMPLERS_REGISTERED = True


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def sample_rate(n: int, batch_size: int) -> float:
    """Opacus's Poisson sampling rate for a loader of this size (1 / batches)."""
    return 1.0 / batches_per_epoch(n, batch_size)


@dataclass
class DPResult:
    train_loss: float
    steps: int  # noise steps that count against the budget
    sample_rate: float
    grad_sample_mode: str


@contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Train without dropout for the duration, then restore every rate.

    DP-SGD's noise already regularises, and dropout on top makes each clipped
    per-sample gradient noisier, which costs far more under DP than it gains: on the
    default cohort (seeds 0 to 3) the DP federation's holdout AUROC was 0.847 on average
    with the genes' input dropout and 0.864 without it, and genomics-only DP training
    0.72 against 0.77. Without DP the same dropout is what keeps the 2,000-gene layer
    from overfitting, so the model keeps it and DP-SGD turns it off.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates = [m.p for m in layers]
    for m in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(layers, rates, strict=True):
            m.p = p


@dataclass(frozen=True)
class NoiseSource:
    """Where DP-SGD's randomness comes from: Gaussian noise on the parameters' device,
    Poisson sampling on the CPU (Opacus's sampler draws there)."""

    noise: torch.Generator
    sampling: torch.Generator

    @staticmethod
    def from_os(device: torch.device) -> NoiseSource:
        return NoiseSource(os_generator(device), os_generator("cpu"))

    @staticmethod
    def seeded(device: torch.device, seed: int) -> NoiseSource:
        """Replayable by whoever knows ``seed``: debugging simulations only."""
        return NoiseSource(seeded_generator(device, seed), seeded_generator("cpu", seed + 1))


def make_private(model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]],
                 loss_fn: nn.Module, spec: TrainSpec, sigma: float, max_grad_norm: float,
                 mode: str, source: NoiseSource, poisson: bool = True
                 ) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module,
                            DataLoader[tuple[torch.Tensor, ...]]]:
    """Wrap model, optimiser, loss and loader for DP-SGD in one place.

    Training and ``benchmarks/dp_overhead.py`` both call this, so the benchmark
    measures exactly what a site runs. ``poisson=False`` (fixed batches) is for
    benchmarks only: the privacy accounting assumes Poisson sampling.

    Opacus's ``secure_mode`` would do two things, both wanted: a CSPRNG for noise and
    sampling, and noise drawn as a sum of four Gaussians, which defeats the
    floating-point attacks on a single draw. It insists on ``torchcsprng`` for the
    first, which does not build here, so the site supplies OS-keyed generators itself
    (``source``, see :mod:`mmfed.privacy.rng`): the sampler is built with one
    (``DPDataLoader.from_data_loader``), the optimiser draws with the other, and the
    optimiser's ``secure_mode`` is switched on for the four-sample noise.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    register_samplers()
    with warnings.catch_warnings():
        # The engine warns that its CSPRNG is off; the generators below replace it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    optimizer = make_optimizer(model, spec)
    if poisson:
        loader = DPDataLoader.from_data_loader(loader, generator=source.sampling)
    common = {"module": model, "optimizer": optimizer, "data_loader": loader,
              "noise_multiplier": sigma, "max_grad_norm": max_grad_norm,
              "poisson_sampling": False, "noise_generator": source.noise}
    if mode == "ghost":
        pmodel, popt, pcrit, ploader = engine.make_private(
            **common, criterion=loss_fn, grad_sample_mode="ghost")
    else:
        pmodel, popt, ploader = engine.make_private(**common, grad_sample_mode=mode)
        pcrit = loss_fn
    popt.secure_mode = True  # four Gaussian draws per noise value (see above)
    if poisson:
        pmodel.forbid_grad_accumulation()  # what Opacus does for its own Poisson loader
    return pmodel, popt, pcrit, ploader


def train_private(model: nn.Module, enc: EncodedSite, spec: TrainSpec, task: Task | int,
                  sigma: float, max_grad_norm: float, seed: int,
                  device: torch.device | None = None, mode: str = "hooks",
                  source: NoiseSource | None = None) -> DPResult:
    """Train ``model`` in place with DP-SGD; its plain state_dict holds the result.

    ``seed`` drives only what needs no secrecy (modality dropout); the noise and the
    Poisson sampling come from ``source``, by default fresh OS-keyed generators.
    """
    device = device or torch.device("cpu")
    model.to(device)
    source = source or NoiseSource.from_os(device)
    enc = restrict_modalities(enc, spec.modalities)
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        tensor_dataset(enc, as_task(task)), batch_size=spec.batch_size)
    loss_fn = make_loss(enc.labels, task, spec).to(device)
    model.train()
    try:
        pmodel, popt, pcrit, ploader = make_private(model, loader, loss_fn, spec, sigma,
                                                    max_grad_norm, mode, source)
    except (NotImplementedError, ValueError) as exc:
        if mode != "ghost":
            raise
        log.info("ghost clipping unavailable (%s); using per-sample gradient hooks", exc)
        mode = "hooks"
        pmodel, popt, pcrit, ploader = make_private(model, loader, loss_fn, spec, sigma,
                                                    max_grad_norm, mode, source)
    with dropout_off(model):
        loss, _, draws = train_epochs(pmodel, ploader, popt, pcrit, spec.epochs, device,
                                      spec.modality_dropout, seed)
    close = getattr(pmodel, "_close", None)
    if callable(close):
        close()  # remove Opacus hooks from the caller's model
    return DPResult(train_loss=loss, steps=draws,  # every Poisson draw counts
                    sample_rate=sample_rate(len(enc), spec.batch_size), grad_sample_mode=mode)
