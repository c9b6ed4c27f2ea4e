"""Federation-wide feature schema, site encoding and the multimodal model.

Two small hand-made site folders (written to disk and read back with ``load_site``) give
exact control over which columns, values, images and gene profiles each site has:

* ``alpha``: age, crp (one gap), smoking (categorical); images for 4 of 6 patients (one
  of them constant); genomics for 5 of 6 patients with one "NA" cell.
* ``beta``: age, bmi, smoking (one gap); no images, no genomics.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.data.reader import SiteData, load_site
from mmfed.data.sitespec import SiteSpec, write_site_spec
from mmfed.ml.features import (
    HASH_BUCKETS,
    ColumnNames,
    EncodedSite,
    FeatureSchema,
    StatsLayout,
    column_moments,
    column_names,
    encode,
    merge_names,
    pool_moments,
    pooled_schema,
    schema_from_moments,
    split_indices,
)
from mmfed.ml.model import FUSIONS, ModelSpec, MultimodalNet, build_model
from mmfed.ml.training import TrainSpec, make_loss, tensor_dataset, train_epochs

SIZE = 16
SECRET = "XQZ"  # marks every category value: none may reach the shared statistics

ALPHA = {
    "ids": ["A1", "A2", "A3", "A4", "A5", "A6"],
    "label": ["0", "1", "0", "1", "1", "0"],
    "age": ["50", "61", "47", "70", "58", "66"],
    "crp": ["1.5", "", "9.0", "12.5", "3.0", "0.5"],
    "smoking": [f"never-{SECRET}", f"current-{SECRET}", f"never-{SECRET}",
                f"former-{SECRET}", f"current-{SECRET}", f"rare-{SECRET}-7"],
}
ALPHA_IMAGES = {"A1", "A2", "A4", "A6"}  # A6's image is constant
ALPHA_GENOMICS = {"A1": ["5.0", "7.5"], "A2": ["6.0", "NA"], "A3": ["4.0", "8.0"],
                  "A4": ["5.5", "9.0"], "A6": ["6.5", "7.0"]}
BETA = {
    "ids": ["B1", "B2", "B3", "B4", "B5"],
    "label": ["1", "0", "0", "1", "0"],
    "age": ["33", "45", "52", "39", "80"],
    "bmi": ["22.5", "31.0", "27.5", "24.0", "29.5"],
    "smoking": [f"never-{SECRET}", "", f"current-{SECRET}", f"never-{SECRET}",
                f"former-{SECRET}"],
}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_site(folder: Path, cols: dict[str, list[str]], images: set[str] | None,
               genomics: dict[str, list[str]] | None) -> Path:
    folder.mkdir(parents=True)
    clinical = [c for c in cols if c not in ("ids", "label")]
    header = ["patient_id", "label", *clinical]
    rows = [[pid, cols["label"][i], *(cols[c][i] for c in clinical)]
            for i, pid in enumerate(cols["ids"])]
    write_csv(folder / "records.csv", header, rows)
    if images is not None:
        (folder / "images").mkdir()
        rng = np.random.default_rng(len(folder.name))
        for pid in sorted(images):
            arr = (np.full((SIZE, SIZE), 77.0) if pid == "A6"
                   else rng.uniform(0, 255, (SIZE, SIZE)))
            np.save(folder / "images" / f"{pid}.npy", arr.astype(np.float32))
    if genomics is not None:
        write_csv(folder / "genomics.csv", ["patient_id", "G1", "G2"],
                  [[pid, *vals] for pid, vals in genomics.items()])
    spec = SiteSpec(name=folder.name, label="label", classes=("0", "1"),
                    modalities={"records": True, "images": images is not None,
                                "genomics": genomics is not None},
                    image_size=(SIZE, SIZE) if images is not None else None)
    write_site_spec(folder / "site.toml", spec)
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteData, SiteData]:
    root = tmp_path_factory.mktemp("fed")
    a = load_site(write_site(root / "alpha", ALPHA, ALPHA_IMAGES, ALPHA_GENOMICS))
    b = load_site(write_site(root / "beta", BETA, None, None))
    return a, b


@pytest.fixture(scope="module")
def schema(sites: tuple[SiteData, SiteData]) -> FeatureSchema:
    return pooled_schema(list(sites))


@pytest.fixture(scope="module")
def encoded(sites: tuple[SiteData, SiteData],
            schema: FeatureSchema) -> tuple[EncodedSite, EncodedSite]:
    return encode(sites[0], schema), encode(sites[1], schema)


def floats(texts: list[str]) -> np.ndarray:
    return np.array([float(t) for t in texts if t not in ("", "NA")], dtype=np.float64)


def row(site: SiteData, pid: str) -> int:
    return site.ids.index(pid)


# --------------------------------------------------------------------------- schema


def test_sites_read_as_expected(sites: tuple[SiteData, SiteData]) -> None:
    a, b = sites
    assert a.numeric_cols == ["age", "crp"]
    assert a.categorical_cols == ["smoking"]
    assert b.numeric_cols == ["age", "bmi"]
    assert b.images is None
    assert b.genomics is None


def test_schema_columns_are_sorted_union(schema: FeatureSchema) -> None:
    assert schema.numeric == ["age", "bmi", "crp"]
    assert schema.categorical == ["smoking"]
    assert schema.genes == ["G1", "G2"]
    assert schema.image_size == (SIZE, SIZE)
    assert schema.classes == ["0", "1"]


def test_merge_gives_pooled_mean_and_std(schema: FeatureSchema) -> None:
    expected = {
        "age": floats(ALPHA["age"] + BETA["age"]),
        "bmi": floats(BETA["bmi"]),
        "crp": floats(ALPHA["crp"]),  # the gap is not a value
    }
    for j, name in enumerate(schema.numeric):
        assert schema.numeric_mean[j] == pytest.approx(expected[name].mean(), rel=1e-6), name
        assert schema.numeric_std[j] == pytest.approx(expected[name].std(), rel=1e-5), name
    g1 = floats([v[0] for v in ALPHA_GENOMICS.values()])
    g2 = floats([v[1] for v in ALPHA_GENOMICS.values()])
    assert schema.gene_mean == pytest.approx([g1.mean(), g2.mean()], rel=1e-6)
    assert schema.gene_std == pytest.approx([g1.std(), g2.std()], rel=1e-5)


def test_merge_is_independent_of_site_order(sites: tuple[SiteData, SiteData],
                                            schema: FeatureSchema) -> None:
    other = pooled_schema([sites[1], sites[0]])
    assert other.numeric == schema.numeric
    assert other.numeric_mean == pytest.approx(schema.numeric_mean)
    assert other.numeric_std == pytest.approx(schema.numeric_std)


def test_schema_survives_config_round_trip(schema: FeatureSchema) -> None:
    assert FeatureSchema.from_config(json.loads(json.dumps(schema.to_config()))) == schema


def test_column_names_share_no_numbers_category_values_or_ids(
        sites: tuple[SiteData, SiteData]) -> None:
    """What a site states in the clear: column names, never a statistic."""
    for site in sites:
        names = column_names(site)
        text = json.dumps(names.to_config())
        assert SECRET not in text
        for pid in site.ids:
            assert f'"{pid}"' not in text
        assert "smoking" in names.categorical  # the column name itself is shared
        assert ColumnNames.from_config(json.loads(text)) == names
        values = json.loads(text)
        assert set(values) == {"classes", "numeric", "categorical", "genes", "image_size",
                               "kind", "unit"}  # the task as declared, not a statistic
        assert all(isinstance(v, str) for k in ("classes", "numeric", "categorical", "genes")
                   for v in values[k])  # names only: no count, sum or spread
        assert isinstance(values["kind"], str) and isinstance(values["unit"], str)


def test_moments_are_bounded_and_give_the_pooled_schema(sites: tuple[SiteData, SiteData],
                                                        schema: FeatureSchema) -> None:
    """Each site's contribution is clipped to [-1, 1] and its count capped, and the
    count-weighted moments give the same schema as the pooled data."""
    layout = merge_names([column_names(s) for s in sites]).with_scales(list(sites))
    parts = [column_moments(s, layout) for s in sites]
    for moments, counts in parts:
        assert moments.shape == (2 * layout.columns,) and np.abs(moments).max() <= 1.0
        assert counts.shape == (layout.columns,) and (counts >= 0).all()
    capped = column_moments(sites[0], layout, count_cap=2)[1]
    assert capped.max() <= 2
    again = schema_from_moments(layout, *pool_moments(parts))
    assert again.numeric_mean == pytest.approx(schema.numeric_mean)
    assert again.gene_std == pytest.approx(schema.gene_std)
    assert StatsLayout.from_config(json.loads(json.dumps(layout.to_config()))) == layout
    # a tiny scale clips: bounded influence, a wrong but finite schema
    tight = StatsLayout(**{**layout.__dict__, "scales": [1e-3] * layout.columns})
    moments, _ = column_moments(sites[0], tight)
    assert np.abs(moments).max() <= 1.0


def test_sites_with_different_classes_are_refused(sites: tuple[SiteData, SiteData]) -> None:
    from mmfed.errors import DataError

    a = column_names(sites[0])
    b = column_names(sites[1])
    b.classes = ["neg", "pos"]
    with pytest.raises(DataError, match="classes"):
        merge_names([a, b])


# --------------------------------------------------------------------------- encoding


def test_arrays_are_finite_and_typed(encoded: tuple[EncodedSite, EncodedSite]) -> None:
    for enc in encoded:
        for name in ("num", "num_missing", "image", "genomics", "mask"):
            arr = getattr(enc, name)
            assert arr.dtype == np.float32, name
            assert np.isfinite(arr).all(), name
        assert enc.cat.dtype == np.int64
        assert enc.labels.dtype == np.int64
        n = len(enc)
        assert enc.num.shape == enc.num_missing.shape == (n, 3)
        assert enc.cat.shape == (n, 1)
        assert enc.image.shape == (n, 1, SIZE, SIZE)
        assert enc.genomics.shape == (n, 2)
        assert enc.mask.shape == (n, 3)


def test_numeric_standardized_with_pooled_stats(sites: tuple[SiteData, SiteData],
                                                schema: FeatureSchema,
                                                encoded: tuple[EncodedSite, EncodedSite]
                                                ) -> None:
    a, _ = sites
    enc_a, _ = encoded
    j = schema.numeric.index("age")
    z = (floats(ALPHA["age"]) - schema.numeric_mean[j]) / schema.numeric_std[j]
    assert enc_a.num[:, j] == pytest.approx(z, abs=1e-5)
    assert (enc_a.num_missing[:, j] == 0).all()
    # Pooled standardization: age over both sites has mean 0 and std 1.
    both = np.concatenate([e.num[:, j] for e in encoded])
    assert both.mean() == pytest.approx(0.0, abs=1e-5)
    assert both.std() == pytest.approx(1.0, abs=1e-5)
    # crp's gap at A2 is missing, not a value.
    k = schema.numeric.index("crp")
    assert enc_a.num_missing[row(a, "A2"), k] == 1.0
    assert enc_a.num[row(a, "A2"), k] == 0.0
    assert enc_a.num_missing[:, k].sum() == 1.0


def test_column_absent_at_a_site_encodes_as_missing(schema: FeatureSchema,
                                                   encoded: tuple[EncodedSite, EncodedSite]
                                                   ) -> None:
    enc_a, enc_b = encoded
    crp, bmi = schema.numeric.index("crp"), schema.numeric.index("bmi")
    assert (enc_b.num_missing[:, crp] == 1.0).all()
    assert (enc_b.num[:, crp] == 0.0).all()
    assert (enc_a.num_missing[:, bmi] == 1.0).all()
    assert (enc_a.num[:, bmi] == 0.0).all()
    assert (enc_b.num_missing[:, bmi] == 0.0).all()


def test_categorical_values_are_hashed_consistently(sites: tuple[SiteData, SiteData],
                                                     encoded: tuple[EncodedSite, EncodedSite]
                                                     ) -> None:
    a, b = sites
    enc_a, enc_b = encoded
    present_a = enc_a.cat[:, 0]
    assert ((present_a >= 1) & (present_a < HASH_BUCKETS)).all()  # 0 only for missing
    assert enc_b.cat[row(b, "B2"), 0] == 0  # the missing value
    others = np.delete(enc_b.cat[:, 0], row(b, "B2"))
    assert ((others >= 1) & (others < HASH_BUCKETS)).all()
    # The same category text maps to the same bucket at both sites.
    assert enc_a.cat[row(a, "A1"), 0] == enc_b.cat[row(b, "B1"), 0]
    assert enc_a.cat[row(a, "A2"), 0] == enc_b.cat[row(b, "B3"), 0]
    assert enc_a.cat[row(a, "A4"), 0] == enc_b.cat[row(b, "B5"), 0]
    assert len({int(v) for v in present_a}) >= 2  # not everything in one bucket


def test_images(sites: tuple[SiteData, SiteData],
                encoded: tuple[EncodedSite, EncodedSite]) -> None:
    a, _ = sites
    enc_a, enc_b = encoded
    for pid in ALPHA["ids"]:
        i = row(a, pid)
        if pid in ALPHA_IMAGES:
            assert enc_a.mask[i, 1] == 1.0
        else:
            assert enc_a.mask[i, 1] == 0.0
            assert not enc_a.image[i].any()
    varied = enc_a.image[row(a, "A1"), 0]
    assert varied.mean() == pytest.approx(0.0, abs=1e-4)  # per-image standardized
    assert varied.std() == pytest.approx(1.0, abs=1e-3)
    assert not enc_a.image[row(a, "A6")].any()  # constant image: no NaN, just zeros
    assert (enc_b.mask[:, 1] == 0.0).all()
    assert not enc_b.image.any()


def test_genomics(sites: tuple[SiteData, SiteData], schema: FeatureSchema,
                  encoded: tuple[EncodedSite, EncodedSite]) -> None:
    a, _ = sites
    enc_a, enc_b = encoded
    assert enc_a.mask[row(a, "A5"), 2] == 0.0  # no profile
    assert not enc_a.genomics[row(a, "A5")].any()
    assert enc_a.mask[row(a, "A2"), 2] == 1.0
    assert enc_a.genomics[row(a, "A2"), 1] == 0.0  # the NA cell is imputed, not NaN
    z = (5.0 - schema.gene_mean[0]) / schema.gene_std[0]
    assert enc_a.genomics[row(a, "A1"), 0] == pytest.approx(z, abs=1e-5)
    assert (enc_b.mask[:, 2] == 0.0).all()
    assert not enc_b.genomics.any()
    assert (enc_a.mask[:, 0] == 1.0).all() and (enc_b.mask[:, 0] == 1.0).all()


def test_encoded_subset_and_concat(encoded: tuple[EncodedSite, EncodedSite]) -> None:
    both = EncodedSite.concat(list(encoded))
    assert len(both) == len(encoded[0]) + len(encoded[1])
    sub = both.subset(np.array([0, len(encoded[0])]))
    assert np.array_equal(sub.num[1], encoded[1].num[0])
    assert np.array_equal(sub.labels, [encoded[0].labels[0], encoded[1].labels[0]])


def test_split_indices_deterministic_disjoint_and_covering() -> None:
    ids = [f"P{i:04d}" for i in range(400)]
    labels = np.array([1 if i % 4 == 0 else 0 for i in range(400)])  # 100 vs 300
    tr, va = split_indices(ids, labels, 0.25, seed=3)
    tr2, va2 = split_indices(list(ids), labels.copy(), 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(ids)))
    assert np.bincount(labels[va]).tolist() == [75, 25]  # stratified by label
    _, va_other = split_indices(ids, labels, 0.25, seed=4)
    assert not np.array_equal(va, va_other)
    # By id, not by position: reordering rows keeps each patient on its side.
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    _, va_shuf = split_indices(shuffled, labels[order], 0.25, seed=3)
    assert {shuffled[i] for i in va_shuf} == {ids[i] for i in va}
    tr0, va0 = split_indices(ids, labels, 0.0, seed=3)
    assert len(va0) == 0 and len(tr0) == len(ids)


def test_split_indices_small_site_keeps_training_rows() -> None:
    ids = [f"S{i}" for i in range(7)]
    labels = np.array([0, 0, 0, 0, 0, 1, 1])
    tr, va = split_indices(ids, labels, 0.5, seed=0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(7))
    assert set(labels[va].tolist()) == {0, 1}  # both classes validated
    assert set(labels[tr].tolist()) == {0, 1}  # and both still trained on


# --------------------------------------------------------------------------- model


def batch(enc: EncodedSite) -> tuple[torch.Tensor, ...]:
    return tuple(tensor_dataset(enc).tensors[:-1])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_model_is_opacus_valid(schema: FeatureSchema, fusion: str) -> None:
    from opacus.validators import ModuleValidator

    model = build_model(schema, ModelSpec(fusion=fusion), seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in model.modules())


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("classes", [["0", "1"], ["a", "b", "c"]])
def test_forward_shapes(schema: FeatureSchema, encoded: tuple[EncodedSite, EncodedSite],
                        fusion: str, classes: list[str]) -> None:
    sch = FeatureSchema.from_config({**schema.to_config(), "classes": classes})
    model = build_model(sch, ModelSpec(fusion=fusion, embed_dim=8, hidden=16), seed=1)
    model.eval()
    both = EncodedSite.concat(list(encoded))
    out = model(*batch(both))
    assert out.shape == (len(both), len(classes))
    assert torch.isfinite(out).all()


def test_unknown_fusion_is_refused(schema: FeatureSchema) -> None:
    with pytest.raises(ValueError, match="fusion"):
        MultimodalNet(schema, ModelSpec(fusion="sum"))


def test_gated_weights_zero_for_absent_and_sum_to_one(schema: FeatureSchema) -> None:
    model = build_model(schema, ModelSpec(fusion="gated", embed_dim=8), seed=2)
    params = dict(model.fusion.named_parameters())
    bias = next(v for k, v in params.items() if k.startswith("modality_bias"))
    with torch.no_grad():
        bias.copy_(torch.tensor([3.0, -2.0, 0.5]))  # strong preferences, still exact zeros
    combos = torch.tensor([[r, i, g] for r in (0, 1) for i in (0, 1) for g in (0, 1)],
                          dtype=torch.float32)
    mask = combos.repeat(4, 1)
    emb = torch.randn(len(mask), 3, 8) * 5
    with torch.no_grad():
        w = model.fusion.weights(emb, mask)
    assert w.shape == mask.shape
    assert (w[mask == 0] == 0).all()  # exactly zero, not just small
    assert (w[mask == 1] > 0).all()
    sums = w.sum(dim=1)
    present = mask.sum(dim=1) > 0
    assert torch.allclose(sums[present], torch.ones(int(present.sum())), atol=1e-6)
    assert (sums[~present] == 0).all()  # nothing present: no weight, no NaN
    single = mask.sum(dim=1) == 1
    assert torch.allclose(w[single].sum(dim=1), torch.ones(int(single.sum())))


def _perturb(enc: EncodedSite, i: int, modality: str) -> EncodedSite:
    image, genomics = enc.image.copy(), enc.genomics.copy()
    rng = np.random.default_rng(i)
    if modality == "images":
        image[i] = rng.normal(0, 3, image[i].shape)
    else:
        genomics[i] = rng.normal(0, 3, genomics[i].shape)
    return EncodedSite(enc.num, enc.num_missing, enc.cat, image, genomics, enc.mask,
                       enc.labels)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modality", ["images", "genomics"])
def test_absent_modality_is_no_evidence(sites: tuple[SiteData, SiteData],
                                        encoded: tuple[EncodedSite, EncodedSite],
                                        fusion: str, modality: str, schema: FeatureSchema
                                        ) -> None:
    a, _ = sites
    enc = encoded[0]
    col = 1 if modality == "images" else 2
    absent = row(a, "A3") if modality == "images" else row(a, "A5")
    present = row(a, "A1")
    assert enc.mask[absent, col] == 0 and enc.mask[present, col] == 1
    model = build_model(schema, ModelSpec(fusion=fusion), seed=3)
    model.eval()
    with torch.no_grad():
        base = model(*batch(enc))
        changed_absent = model(*batch(_perturb(enc, absent, modality)))
        changed_present = model(*batch(_perturb(enc, present, modality)))
    assert torch.equal(base, changed_absent)
    # Control: the same change for a patient who has the modality does move the output.
    assert not torch.allclose(base[present], changed_present[present], atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("missing", ["mask", "zero_fill"])
def test_explain_path_computes_the_model_itself(encoded: tuple[EncodedSite, EncodedSite],
                                                schema: FeatureSchema, fusion: str,
                                                missing: str) -> None:
    """Explanations re-run only the fusion and head on cached embeddings; with
    ``zero_fill`` too, their probabilities must be the model's own."""
    from mmfed.report.explain import _head_probs, _prepare

    model = build_model(schema, ModelSpec(fusion=fusion, missing=missing), seed=4)
    model.eval()
    both = EncodedSite.concat(list(encoded))
    assert (both.mask == 0).any()  # absent modalities: where zero_fill differs from mask
    h = _prepare(model, both)
    with torch.no_grad():
        direct = torch.softmax(model(*batch(both)), dim=-1)
        explained = _head_probs(model, h.emb_records, h.emb_images, h.emb_genomics, h.mask)
    torch.testing.assert_close(explained, direct, rtol=0, atol=1e-6)


def test_build_model_seed_is_reproducible(schema: FeatureSchema) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        return build_model(schema, ModelSpec(), seed=seed).state_dict()

    s1, s1b, s2 = state(5), state(5), state(6)
    assert s1.keys() == s1b.keys() == s2.keys()
    assert all(torch.equal(s1[k], s1b[k]) for k in s1)
    differing = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert any(k.endswith("weight") for k in differing)
    # Seeding the build must not reseed the caller's random stream.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(schema, ModelSpec(), seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fusion", [
    "concat",
    "gated",
])
def test_opacus_private_training_step(schema: FeatureSchema,
                                      encoded: tuple[EncodedSite, EncodedSite],
                                      fusion: str) -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    both = EncodedSite.concat(list(encoded))
    model = build_model(schema, ModelSpec(fusion=fusion, embed_dim=8, hidden=16), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(tensor_dataset(both), batch_size=4, shuffle=False)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel, poptim, ploader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False)
    loss_fn = make_loss(both.labels, len(schema.classes), TrainSpec())
    loss, steps, _ = train_epochs(pmodel, ploader, poptim, loss_fn, 1, torch.device("cpu"))
    assert steps == 3
    assert np.isfinite(loss)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    eps = engine.get_epsilon(delta=1e-5)
    assert 0 < eps < float("inf")

