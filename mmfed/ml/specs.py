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
    embed_dim: int = 8
    hidden: int = 16  # the head's hidden layer
    dropout: float = 0.1  # the head's dropout (off under DP-SGD)
    image_channels: int = 4
    cat_embed_dim: int = 4
    # 2,000 genes, few patients: very narrow, and without DP heavily dropped out
    genomics_hidden: int = 4
    genomics_dropout: float = 0.8
    missing: str = "mask"  # or "zero_fill": absent modalities fed as zeros (baseline only)


@dataclass(frozen=True)
class TrainSpec:
    """Local optimisation settings (from the run config)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.005
    weight_decay: float = 2.0
    class_weighting: str = "balanced"  # or "none"
    modalities: tuple[str, ...] = MODALITY_NAMES
    modality_dropout: float = 0.0  # chance of hiding each present modality per patient
    device: str = "auto"  # "auto" picks CUDA when present
