"""Local training and evaluation of the multimodal model on one site's encoded data.

The same functions serve a federated site, the server's holdout evaluation and the
centralized reference, so the three differ only in which data they see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmfed.config import MODALITY_NAMES, TrainSpec
from mmfed.ml.features import EncodedSite
from mmfed.ml.task import Task, make_task_loss, outputs_of, target_tensor, task_metrics


def restrict_modalities(enc: EncodedSite, modalities: tuple[str, ...]) -> EncodedSite:
    """Hide modalities the run does not use (single-modality baselines, ablations)."""
    if tuple(modalities) == MODALITY_NAMES:
        return enc
    keep = np.array([m in modalities for m in MODALITY_NAMES], dtype=np.float32)
    return EncodedSite(enc.num, enc.num_missing, enc.cat, enc.image, enc.genomics,
                       enc.mask * keep, enc.labels, enc.targets)


def tensor_dataset(enc: EncodedSite, task: Task | None = None) -> TensorDataset:
    """The inputs, then what the task's loss reads (class indices by default)."""
    y = target_tensor(task or Task(), enc.labels, enc.outcome)
    return TensorDataset(torch.from_numpy(enc.num), torch.from_numpy(enc.num_missing),
                         torch.from_numpy(enc.cat), torch.from_numpy(enc.image),
                         torch.from_numpy(enc.genomics), torch.from_numpy(enc.mask),
                         torch.from_numpy(y))


def as_task(task: Task | int) -> Task:
    """A task from a class count, for callers that only ever classify."""
    if isinstance(task, Task):
        return task
    return Task(classes=tuple(str(c) for c in range(task)))


def model_task(model: nn.Module) -> Task:
    """The task a model was built for (``MultimodalNet.task``)."""
    task = getattr(model, "task", None)
    if not isinstance(task, Task):
        raise TypeError("model has no task: build it with mmfed.ml.model.build_model")
    return task


def make_loss(labels: np.ndarray, task: Task | int, spec: TrainSpec) -> nn.Module:
    loss: nn.Module = make_task_loss(as_task(task), labels, spec.class_weighting)
    return loss


def drop_modalities(mask: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Hide each present modality of each patient with probability ``rate``.

    Teaches the fusion to cope with patients who lack a modality at other sites or at
    inference. A patient never loses everything: if every present modality was drawn,
    the original mask is kept for that patient. Per-patient and independent of other
    patients, so it is compatible with per-sample DP.
    """
    if rate <= 0.0 or mask.numel() == 0:
        return mask
    keep = (torch.rand(mask.shape, generator=gen) >= rate).to(mask.dtype).to(mask.device)
    dropped = mask * keep
    empty = dropped.sum(dim=1, keepdim=True) == 0
    return torch.where(empty, mask, dropped)


def train_epochs(model: nn.Module, loader: DataLoader[Any], optimizer: torch.optim.Optimizer,
                 loss_fn: nn.Module, epochs: int, device: torch.device,
                 modality_dropout: float = 0.0, seed: int = 0) -> tuple[float, int, int]:
    """The training loop shared by plain and DP training.

    Returns (mean loss over non-empty batches, optimizer steps, batches drawn). Under
    Poisson sampling a drawn batch can be empty: it is skipped but still drawn, and DP
    accounting counts draws. The mask is the last input (see ``tensor_dataset``).
    """
    model.train()
    gen = torch.Generator().manual_seed(seed)
    total, steps, draws = 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            draws += 1
            *inputs, y = (t.to(device) for t in batch)
            if y.numel() == 0:
                continue
            inputs[-1] = drop_modalities(inputs[-1], modality_dropout, gen)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(*inputs), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), steps, draws


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW, or plain SGD (no momentum: a FedSGD round is one stateless step)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def site_spec(spec: TrainSpec, n_train: int) -> TrainSpec:
    """The spec one site trains with: under ``full_batch`` its batch is all its patients,
    so every step is one step over the whole site (Poisson sample rate 1 under DP)."""
    if not spec.full_batch:
        return spec
    return spec.model_copy(update={"batch_size": max(1, int(n_train))})


def train_local(model: nn.Module, enc: EncodedSite, spec: TrainSpec, task: Task | int,
                seed: int, device: torch.device | None = None) -> dict[str, float]:
    """Non-private local training (the DP path wraps the same loop)."""
    device = device or torch.device("cpu")
    model.to(device)
    enc = restrict_modalities(enc, spec.modalities)
    gen = torch.Generator().manual_seed(seed)
    task = as_task(task)
    loader = DataLoader(tensor_dataset(enc, task), batch_size=spec.batch_size, shuffle=True,
                        generator=gen)
    loss_fn = make_loss(enc.labels, task, spec).to(device)
    torch.manual_seed(seed)  # dropout masks
    loss, steps, _ = train_epochs(model, loader, make_optimizer(model, spec), loss_fn,
                                  spec.epochs, device, spec.modality_dropout, seed)
    return {"train_loss": loss, "steps": float(steps), "num_examples": float(len(enc))}


@torch.no_grad()
def predict(model: nn.Module, enc: EncodedSite, modalities: tuple[str, ...] = MODALITY_NAMES,
            batch_size: int = 256, device: torch.device | None = None,
            task: Task | None = None) -> tuple[np.ndarray, float]:
    """The task's outputs (class probabilities, values, or survival curves at the
    cuts: ``outputs_of``) and the mean unweighted loss of the task."""
    device = device or torch.device("cpu")
    task = task or model_task(model)
    model.to(device)
    model.eval()
    enc = restrict_modalities(enc, modalities)
    loader = DataLoader(tensor_dataset(enc, task), batch_size=batch_size, shuffle=False)
    loss_fn = make_task_loss(task, enc.labels, "none").to(device)
    loss_fn.reduction = "sum"
    outs, total = [], 0.0
    for batch in loader:
        *inputs, y = (t.to(device) for t in batch)
        logits = model(*inputs)
        total += float(loss_fn(logits, y))
        outs.append(outputs_of(task, logits))
    empty = np.zeros((0, task.outputs) if task.kind != "regression" else (0,))
    return (np.concatenate(outs) if outs else empty), total / max(len(enc), 1)


def evaluate(model: nn.Module, enc: EncodedSite, modalities: tuple[str, ...] = MODALITY_NAMES,
             device: torch.device | None = None, task: Task | None = None
             ) -> dict[str, float | None]:
    task = task or model_task(model)
    outputs, loss = predict(model, enc, modalities, device=device, task=task)
    return task_metrics(task, outputs, enc.labels, enc.outcome, loss)
