"""Model and training hyper-parameters as plain data, free of torch.

The config, the server's bookkeeping and a site's non-training message handlers need
these names and defaults; keeping them out of ``model``/``training`` means those
paths never pay torch's import time (seconds per ClientApp process in deployment).
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITY_NAMES = ("records", "images", "genomics")
FUSIONS = ("concat", "gated")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters (from the run config)."""

    fusion: str = "gated"
    embed_dim: int = 32
    hidden: int = 64
    dropout: float = 0.1
    image_channels: int = 8
    cat_embed_dim: int = 4
    genomics_hidden: int = 16  # narrow and heavily dropped out: 2,000 genes, few patients
    genomics_dropout: float = 0.5
    missing: str = "mask"  # or "zero_fill": absent modalities fed as zeros (baseline only)


@dataclass(frozen=True)
class TrainSpec:
    """Local optimisation settings (from the run config)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.001
    weight_decay: float = 0.05
    class_weighting: str = "balanced"  # or "none"
    modalities: tuple[str, ...] = MODALITY_NAMES
    modality_dropout: float = 0.0  # chance of hiding each present modality per patient
    device: str = "auto"  # "auto" picks CUDA when present
