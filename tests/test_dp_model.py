"""The DP-oriented parts of the model and of local DP-SGD.

A small synthetic cohort (real files, read back with ``load_site``) gives a schema with
numeric, categorical, image and gene features. The checks: every per-sample gradient
Opacus computes for the default model is exact (compared with one backward pass per
patient); the parameter-free image pooling is the same fixed function at every site and
never travels; and DP training turns dropout off only while it runs.
"""

from __future__ import annotations

import copy
import warnings
from statistics import NormalDist

import pytest
import torch
from torch import nn

from mmfed.config import TrainSpec
from mmfed.data import load_site
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.ml.features import EncodedSite, FeatureSchema, encode, pooled_schema
from mmfed.ml.model import FUSIONS, ModelSpec, OrderStatisticPool, build_model
from mmfed.ml.training import tensor_dataset
from mmfed.privacy import dp_sgd


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSchema, EncodedSite]:
    root = tmp_path_factory.mktemp("dp") / "fed"
    synthesize(root, SynthSettings(sites=1, patients_per_site=48, holdout=20, genes=30,
                                   image_size=16, seed=3))
    site = load_site(root / "site-1")
    schema = pooled_schema([site])
    return schema, encode(site, schema)


def _inputs(enc: EncodedSite, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    *x, y = (t[:n] for t in tensor_dataset(enc).tensors)
    mask = x[-1].clone()
    mask[0, 1] = 0.0  # one patient without an image, one without genomics, one with
    mask[1, 2] = 0.0  # records only: absent modalities must not break the gradients
    mask[2, 1:] = 0.0
    return [*x[:-1], mask], y


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_sample_gradients_are_exact(cohort: tuple[FeatureSchema, EncodedSite],
                                        fusion: str) -> None:
    from opacus import GradSampleModule

    schema, enc = cohort
    dp_sgd.register_samplers()
    model = build_model(schema, ModelSpec(fusion=fusion), seed=1)
    reference = copy.deepcopy(model)
    x, y = _inputs(enc, 8)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    wrapped = GradSampleModule(model, loss_reduction="sum")
    # Every layer with parameters has a registered per-sample rule: none falls back to
    # Opacus's generic vmap path (slow, and not what the step-time figures measure).
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert type(module) in GradSampleModule.GRAD_SAMPLERS, type(module)
    with dp_sgd.dropout_off(model):
        loss_fn(wrapped(*x), y).backward()
        for i in range(len(y)):
            reference.zero_grad()
            with dp_sgd.dropout_off(reference):
                loss_fn(reference(*(t[i:i + 1] for t in x)), y[i:i + 1]).backward()
            for (name, p), (_, q) in zip(model.named_parameters(),
                                         reference.named_parameters(), strict=True):
                expected = q.grad if q.grad is not None else torch.zeros_like(q)
                assert torch.allclose(p.grad_sample[i], expected, atol=1e-5), (name, i)
    wrapped._close()


def test_order_statistic_pool_is_fixed_and_never_travels(
        cohort: tuple[FeatureSchema, EncodedSite]) -> None:
    schema, enc = cohort
    a, b = build_model(schema, seed=1), build_model(schema, seed=2)
    pool_a, pool_b = a.images.order, b.images.order
    assert list(pool_a.parameters()) == []  # nothing to train, so no DP noise
    assert torch.equal(pool_a.reference, pool_b.reference)  # the same at every site
    for model in (a, b):
        assert not any("reference" in k or "offsets" in k for k in model.state_dict())
    # It is the chosen order statistics of each image, less a standard normal's.
    image = torch.from_numpy(enc.image[:5])
    levels = pool_a.levels
    flat = image.flatten(1).sort(dim=1).values
    ranks = [round(q * (flat.shape[1] - 1)) for q in levels]
    normal = torch.tensor([NormalDist().inv_cdf(min(max(q, 1e-3), 1 - 1e-3))
                           for q in levels])
    assert torch.allclose(OrderStatisticPool()(image), flat[:, ranks] - normal)
    # A brighter spot anywhere moves the top order statistics, wherever it lies.
    shifted = image.clone()
    shifted[:, :, 0, 0] = image.amax() + 5
    assert (OrderStatisticPool()(shifted)[:, -1] > OrderStatisticPool()(image)[:, -1]).all()


def test_dp_training_turns_dropout_off_only_while_it_runs(
        cohort: tuple[FeatureSchema, EncodedSite]) -> None:
    schema, enc = cohort
    model = build_model(schema, ModelSpec(dropout=0.3, genomics_dropout=0.8), seed=5)
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert sorted(rates.values()) == [0.3, 0.8]
    with dp_sgd.dropout_off(model):
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(RuntimeError), dp_sgd.dropout_off(model):
        raise RuntimeError("training failed")
    assert {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)} == rates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_sgd.train_private(model, enc, TrainSpec(batch_size=16, epochs=1), 2, 1.0, 1.0,
                             seed=1)
    assert {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)} == rates
    # Without dropout a DP step is a deterministic function of the batch and the noise:
    # the same (debug-seeded) noise gives the same model twice, while the OS-keyed noise
    # a site really uses differs from run to run, whatever the seed.
    def trained(source: dp_sgd.NoiseSource | None) -> dict[str, torch.Tensor]:
        twin = build_model(schema, seed=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_sgd.train_private(twin, enc, TrainSpec(batch_size=16, epochs=1), 2, 1.0,
                                 1.0, seed=2, source=source)
        return twin.state_dict()

    cpu = torch.device("cpu")
    a, b = (trained(dp_sgd.NoiseSource.seeded(cpu, 11)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = trained(None), trained(None)
    assert any(not torch.equal(c[k], d[k]) for k in c)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_default_model_stays_small(cohort: tuple[FeatureSchema, EncodedSite]) -> None:
    """DP-SGD's noise grows with every trainable parameter; the default model was sized
    for it (about 12,000 at 2,000 genes). Most of them are the genes' first layer."""
    schema, _ = cohort
    model = build_model(schema, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    genes = len(schema.genes)
    # Everything but the gene layer, plus 4 units per gene.
    assert trainable - 4 * genes < 4_500, trainable
    assert len(list(model.parameters())) <= 21  # tensors Opacus hooks, clips and noises
