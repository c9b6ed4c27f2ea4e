"""The multimodal model: one encoder per modality, a fusion, one classification head.

Every layer is one Opacus can compute per-sample gradients for (GroupNorm, never
BatchNorm, whose batch statistics would mix patients). Absent modalities are masked
out of the fusion, so a missing image is "no evidence", not "a black image".

The model is built for DP-SGD, which is on by default: few trainable parameters
(about 12,000; noise grows with every one), bounded tanh activations (tempered
activations keep clipped, noisy updates from blowing up units, Papernot et al.
2021), and parameter-free work where it can carry the signal (order-statistic
pooling of images), since a layer without parameters gets no noise.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfed.config import FUSIONS, MODALITY_NAMES, ModelSpec
from mmfed.ml.encoders import build_encoder, custom_encoders
from mmfed.ml.features import FeatureSchema

__all__ = ["FUSIONS", "MODALITY_NAMES", "ModelSpec", "MultimodalNet", "build_model"]


# Order statistics the image encoder reads, as quantiles of a patient's pixel values.
ORDER_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 1.0)


class OrderStatisticPool(nn.Module):
    """Parameter-free global pooling: chosen quantiles of each image's pixel values.

    Max pooling generalised to several ranks: how bright the brightest 0.2 %, 1 %,
    10 %, ... of a scan are, wherever they lie. It has nothing to train, so DP-SGD adds
    no noise to it, and it is the same fixed function at every site. Images are
    standardised per image, so a featureless scan's quantiles are roughly a standard
    normal's; those are subtracted, which centres the features near zero for the
    trainable projection after it (DP-SGD's few, noisy steps cannot afford to learn a
    large offset first).
    """

    reference: torch.Tensor

    def __init__(self, levels: tuple[float, ...] = ORDER_LEVELS) -> None:
        super().__init__()
        self.levels = levels
        from statistics import NormalDist

        normal = NormalDist()
        reference = [normal.inv_cdf(min(max(q, 1e-3), 1 - 1e-3)) for q in levels]
        # Not persistent: derived from constants, so never sent, averaged or saved.
        self.register_buffer("reference", torch.tensor(reference), persistent=False)
        # Rank positions per (pixel count, device), made once: indexing with a Python
        # list copies it to the device on every call, which on CUDA waits for the GPU.
        self._ranks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        key = (flat.shape[1], flat.device)
        ranks = self._ranks.get(key)
        if ranks is None:
            n = flat.shape[1]
            ranks = torch.tensor([min(n - 1, round(q * (n - 1))) for q in self.levels],
                                 device=flat.device)
            self._ranks[key] = ranks
        return flat.sort(dim=1).values.index_select(1, ranks) - self.reference


class ImageEncoder(nn.Module):
    """Order statistics at two scales plus a small CNN, projected to the embedding.

    A 2x2 average pooling first halves the resolution: it suppresses pixel noise and
    cuts the convolutions' cost (and with it Opacus's per-sample gradient work) by 4.
    The order statistics carry most of the signal on their own and cost DP nothing;
    the CNN (three GroupNorm conv blocks, global average pooling) adds what depends on
    shape and position.
    """

    def __init__(self, out_dim: int, channels: int = 4) -> None:
        super().__init__()
        c = channels
        self.stem = nn.AvgPool2d(2, ceil_mode=True)
        self.coarse = nn.AvgPool2d(2, ceil_mode=True)
        self.order = OrderStatisticPool()
        # GroupNorm without affine parameters and convolutions without bias (the
        # normalisation would cancel most of it): fewer tensors for Opacus to hook,
        # clip and noise, with no loss of holdout AUROC on the default cohort.
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.GroupNorm(2, c, affine=False),
            nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
            nn.GroupNorm(4, 2 * c, affine=False), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1, bias=False),
            nn.GroupNorm(4, 4 * c, affine=False), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.proj = nn.Linear(4 * c + 2 * len(self.order.levels), out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.stem(x)
        features = torch.cat([self.order(half), self.order(self.coarse(half)),
                              self.body(half)], dim=1)
        return torch.tanh(self.proj(features))


class RecordEncoder(nn.Module):
    """Numeric values with missing-value indicators plus hashed categorical embeddings.

    One linear layer (tanh) after the embeddings: the clinical signal is close to
    linear, and every hidden layer is more parameters for DP-SGD's noise. All
    categorical columns share one embedding table (column j owns rows
    j*buckets .. (j+1)*buckets-1): the same embeddings as one table per column, but one
    module and one tensor for Opacus to hook and clip instead of one per column.
    """

    offsets: torch.Tensor

    def __init__(self, n_numeric: int, n_categorical: int, buckets: int, out_dim: int,
                 cat_dim: int) -> None:
        super().__init__()
        self.n_categorical = n_categorical
        # None without categorical columns: an unused parameter would get no per-sample
        # gradient, which Opacus refuses.
        self.embed = nn.Embedding(n_categorical * buckets, cat_dim) if n_categorical else None
        self.register_buffer("offsets", torch.arange(n_categorical) * buckets,
                             persistent=False)
        width = 2 * n_numeric + cat_dim * n_categorical
        self.mlp = nn.Sequential(nn.Linear(max(width, 1), out_dim), nn.Tanh())
        self.width = width

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor,
                cat: torch.Tensor) -> torch.Tensor:
        parts = [num, num_missing]
        if self.embed is not None:
            parts.append(self.embed(cat + self.offsets).flatten(1))
        x = torch.cat(parts, dim=1) if self.width else num.new_zeros(num.shape[0], 1)
        return self.mlp(x)


class GenomicEncoder(nn.Module):
    """A very narrow MLP over standardized expression values.

    The first layer (genes x hidden) is most of the model's parameters, so it is kept to
    a few units: without DP the heavy input dropout regularises it, and under DP-SGD
    (which trains with dropout off) its width bounds how much noise the genes add.
    """

    def __init__(self, n_genes: int, out_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(max(n_genes, 1), hidden),
                                 nn.Tanh(), nn.Linear(hidden, out_dim), nn.Tanh())
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
    which replays forward with the first input only. ``mmfed.privacy.dp_sgd``
    registers its exact per-sample gradient (the gradient of the output), so Opacus
    does not fall back to vmap for it either.
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
        self.value_gate = nn.Linear(dim, 2 * hidden)  # value and gate in one layer
        # No bias: one constant added to every modality's score cancels in the softmax,
        # so it could learn nothing, and under DP-SGD it would only collect noise.
        self.score = nn.Linear(hidden, 1, bias=False)
        self.modality_bias = ModalityBias(n_modalities)
        self.out_dim = dim

    def weights(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        value, gate = self.value_gate(embeddings).chunk(2, dim=-1)
        h = torch.tanh(value) * torch.sigmoid(gate)
        logits = self.modality_bias(self.score(h).squeeze(-1))
        logits = logits.masked_fill(mask < 0.5, -1e4)
        return torch.softmax(logits, dim=1) * mask

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(embeddings, mask)
        return (w.unsqueeze(-1) * embeddings).sum(dim=1)


class MultimodalNet(nn.Module):
    """Image + record + genomic encoders, fused, one task head (classes, a value, or
    one hazard per survival interval: ``Task.outputs``)."""

    def __init__(self, schema: FeatureSchema, spec: ModelSpec | None = None) -> None:
        super().__init__()
        spec = spec or ModelSpec()
        if spec.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {spec.fusion!r} (choose {', '.join(FUSIONS)})")
        d = spec.embed_dim
        self.task = schema.task  # what the head's outputs mean (predict reads it)
        custom = custom_encoders(spec)  # model.*_encoder entry points (mmfed.ml.encoders)
        self.records: nn.Module = (
            build_encoder("record_encoder", custom["record_encoder"], d, schema)
            if "record_encoder" in custom else
            RecordEncoder(len(schema.numeric), len(schema.categorical), schema.hash_buckets,
                          d, spec.cat_embed_dim))
        self.images: nn.Module = (
            build_encoder("image_encoder", custom["image_encoder"], d, schema)
            if "image_encoder" in custom else ImageEncoder(d, spec.image_channels))
        self.genomics: nn.Module = (
            build_encoder("genomic_encoder", custom["genomic_encoder"], d, schema)
            if "genomic_encoder" in custom else
            GenomicEncoder(len(schema.genes), d, spec.genomics_hidden, spec.genomics_dropout))
        self.zero_fill = spec.missing == "zero_fill"
        self.fusion: ConcatFusion | GatedAttentionFusion = (
            GatedAttentionFusion(d, 3) if spec.fusion == "gated" else ConcatFusion(d, 3))
        out = nn.Linear(spec.hidden, schema.task.outputs)
        self.head = nn.Sequential(nn.Linear(self.fusion.out_dim, spec.hidden), nn.Tanh(),
                                  nn.Dropout(spec.dropout), out)
        if self.task.kind == "survival":
            # Start from the federation's baseline hazard (agreed from summed
            # histograms, in the schema) instead of 1/2 per interval, so the first
            # rounds learn who is at higher risk, not the curve's overall level. Without
            # one: with cuts at event quantiles, about 1 in (intervals left + 1) fails.
            k = self.task.outputs
            hazard = (torch.tensor(self.task.baseline, dtype=torch.float32)
                      if self.task.baseline else
                      1.0 / (k + 1 - torch.arange(k, dtype=torch.float32)))
            with torch.no_grad():
                out.bias.copy_(torch.log(hazard / (1 - hazard)))

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor,
                image: torch.Tensor, genomics: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        emb = torch.stack([self.records(num, num_missing, cat), self.images(image),
                           self.genomics(genomics)], dim=1)
        return self.fused_logits(emb, mask)

    def fused_logits(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from per-modality embeddings (n, modalities, d) and their mask (n, modalities).

        Everything after the encoders, in one place: explanations re-run only the encoder
        a perturbation touched and then this, so they explain exactly the model that
        ``forward`` computes.
        """
        if self.zero_fill:  # the naive baseline: zeros pose as an observed modality
            mask = torch.ones_like(mask)
        return self.head(self.fusion(embeddings, mask))


def build_model(schema: FeatureSchema, spec: ModelSpec | None = None,
                seed: int | None = None) -> MultimodalNet:
    """Build the model; with a seed, every site and the server start from the same weights."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MultimodalNet(schema, spec)
    return MultimodalNet(schema, spec)
