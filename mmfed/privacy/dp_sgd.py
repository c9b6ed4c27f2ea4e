"""Local DP-SGD with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

Ghost clipping is the default because it never materialises per-sample gradients;
when a model has a layer ghost clipping cannot handle, training falls back to
Opacus's hook-based per-sample gradients and says so once.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmfed.features import EncodedSite
from mmfed.specs import TrainSpec
from mmfed.training import (
    make_loss,
    make_optimizer,
    restrict_modalities,
    tensor_dataset,
    train_epochs,
)

log = logging.getLogger("mmfed")


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


def _private(model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]],
             loss_fn: nn.Module, spec: TrainSpec, sigma: float, max_grad_norm: float,
             mode: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module,
                                            DataLoader[tuple[torch.Tensor, ...]]]:
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    optimizer = make_optimizer(model, spec)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "ghost":
            pmodel, popt, pcrit, ploader = engine.make_private(
                module=model, optimizer=optimizer, criterion=loss_fn, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=max_grad_norm, poisson_sampling=True,
                grad_sample_mode="ghost", noise_generator=gen)
            return pmodel, popt, pcrit, ploader
        pmodel, popt, ploader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
            noise_generator=gen)
        return pmodel, popt, loss_fn, ploader


def train_private(model: nn.Module, enc: EncodedSite, spec: TrainSpec, n_classes: int,
                  sigma: float, max_grad_norm: float, seed: int,
                  device: torch.device | None = None, mode: str = "ghost") -> DPResult:
    """Train ``model`` in place with DP-SGD; its plain state_dict holds the result."""
    device = device or torch.device("cpu")
    model.to(device)
    enc = restrict_modalities(enc, spec.modalities)
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        tensor_dataset(enc), batch_size=spec.batch_size)
    loss_fn = make_loss(enc.labels, n_classes, spec).to(device)
    torch.manual_seed(seed)
    model.train()
    try:
        pmodel, popt, pcrit, ploader = _private(model, loader, loss_fn, spec, sigma,
                                                max_grad_norm, mode, seed)
    except (NotImplementedError, ValueError) as exc:
        if mode != "ghost":
            raise
        log.info("ghost clipping unavailable (%s); using per-sample gradient hooks", exc)
        mode = "hooks"
        pmodel, popt, pcrit, ploader = _private(model, loader, loss_fn, spec, sigma,
                                                max_grad_norm, mode, seed)
    loss, _, draws = train_epochs(pmodel, ploader, popt, pcrit, spec.epochs, device,
                                  spec.modality_dropout, seed)
    close = getattr(pmodel, "_close", None)
    if callable(close):
        close()  # remove Opacus hooks from the caller's model
    return DPResult(train_loss=loss, steps=draws,  # every Poisson draw counts
                    sample_rate=sample_rate(len(enc), spec.batch_size), grad_sample_mode=mode)
