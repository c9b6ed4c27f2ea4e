"""The multimodal model: one encoder per modality, a fusion, one classification head.

Every layer is one Opacus can compute per-sample gradients for (GroupNorm, never
BatchNorm, whose batch statistics would mix patients). Absent modalities are masked
out of the fusion, so a missing image is "no evidence", not "a black image".
"""

from __future__ import annotations

import torch
from torch import nn

from mmfed.features import FeatureSchema
from mmfed.specs import FUSIONS, MODALITY_NAMES, ModelSpec

__all__ = ["FUSIONS", "MODALITY_NAMES", "ModelSpec", "MultimodalNet", "build_model"]


class ImageEncoder(nn.Module):
    """A small CNN: three conv blocks, global average pooling, a projection."""

    def __init__(self, out_dim: int, channels: int = 8) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(2, c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GroupNorm(4, 2 * c), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.GroupNorm(4, 4 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.proj = nn.Linear(4 * c, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.body(x)))


class RecordEncoder(nn.Module):
    """Numeric values with missing-value indicators plus hashed categorical embeddings."""

    def __init__(self, n_numeric: int, n_categorical: int, buckets: int, out_dim: int,
                 hidden: int, cat_dim: int, dropout: float) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(buckets, cat_dim) for _ in range(n_categorical))
        width = 2 * n_numeric + cat_dim * n_categorical
        self.mlp = nn.Sequential(nn.Linear(max(width, 1), hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_dim), nn.ReLU())
        self.width = width

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor,
                cat: torch.Tensor) -> torch.Tensor:
        parts = [num, num_missing] + [emb(cat[:, j]) for j, emb in enumerate(self.embeds)]
        x = torch.cat(parts, dim=1) if self.width else num.new_zeros(num.shape[0], 1)
        return self.mlp(x)


class GenomicEncoder(nn.Module):
    """An MLP over standardized expression values."""

    def __init__(self, n_genes: int, out_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(max(n_genes, 1), hidden),
                                 nn.ReLU(), nn.Linear(hidden, out_dim), nn.ReLU())
        self.n_genes = n_genes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_genes == 0:
            x = x.new_zeros(x.shape[0], 1)
        return self.mlp(x)


class ConcatFusion(nn.Module):
    """Concatenate masked embeddings plus the mask itself (so absence is visible)."""

    def __init__(self, dim: int, n_modalities: int) -> None:
        super().__init__()
        self.out_dim = dim * n_modalities + n_modalities

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        masked = embeddings * mask.unsqueeze(-1)
        return torch.cat([masked.flatten(1), mask], dim=1)


class ModalityBias(nn.Module):
    """A learned per-modality logit offset.

    Its own one-input module so that Opacus computes per-sample gradients for it; a bare
    parameter on the two-input fusion module would force Opacus's generic fallback,
    which replays forward with the first input only.
    """

    def __init__(self, n_modalities: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_modalities))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


class GatedAttentionFusion(nn.Module):
    """Learned per-modality attention weights over the modalities a patient has.

    The softmax runs only over present modalities, so the weights of what a patient
    has always sum to one and an absent modality gets exactly zero weight.
    """

    def __init__(self, dim: int, n_modalities: int, hidden: int = 32) -> None:
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.modality_bias = ModalityBias(n_modalities)
        self.out_dim = dim

    def weights(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.value(embeddings)) * torch.sigmoid(self.gate(embeddings))
        logits = self.modality_bias(self.score(h).squeeze(-1))
        logits = logits.masked_fill(mask < 0.5, -1e4)
        return torch.softmax(logits, dim=1) * mask

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(embeddings, mask)
        return (w.unsqueeze(-1) * embeddings).sum(dim=1)


class MultimodalNet(nn.Module):
    """Image + record + genomic encoders, fused, one classification head."""

    def __init__(self, schema: FeatureSchema, spec: ModelSpec | None = None) -> None:
        super().__init__()
        spec = spec or ModelSpec()
        if spec.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {spec.fusion!r} (choose {', '.join(FUSIONS)})")
        d = spec.embed_dim
        self.records = RecordEncoder(len(schema.numeric), len(schema.categorical),
                                     schema.hash_buckets, d, spec.hidden, spec.cat_embed_dim,
                                     spec.dropout)
        self.images = ImageEncoder(d, spec.image_channels)
        self.genomics = GenomicEncoder(len(schema.genes), d, spec.genomics_hidden,
                                       spec.genomics_dropout)
        self.zero_fill = spec.missing == "zero_fill"
        self.fusion: ConcatFusion | GatedAttentionFusion = (
            GatedAttentionFusion(d, 3) if spec.fusion == "gated" else ConcatFusion(d, 3))
        self.head = nn.Sequential(nn.Linear(self.fusion.out_dim, spec.hidden), nn.ReLU(),
                                  nn.Dropout(spec.dropout),
                                  nn.Linear(spec.hidden, len(schema.classes)))

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor,
                image: torch.Tensor, genomics: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if self.zero_fill:  # the naive baseline: zeros pose as an observed modality
            mask = torch.ones_like(mask)
        emb = torch.stack([self.records(num, num_missing, cat), self.images(image),
                           self.genomics(genomics)], dim=1)
        return self.head(self.fusion(emb, mask))


def build_model(schema: FeatureSchema, spec: ModelSpec | None = None,
                seed: int | None = None) -> MultimodalNet:
    """Build the model; with a seed, every site and the server start from the same weights."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MultimodalNet(schema, spec)
    return MultimodalNet(schema, spec)
