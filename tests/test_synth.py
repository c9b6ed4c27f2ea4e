"""The synthetic cohort: deterministic by seed, valid site folders, labelled synthetic."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mmfed.cli import main
from mmfed.data.reader import read_site
from mmfed.data.sitespec import parse_site_spec
from mmfed.data.synth import SynthSettings, parse_missing, synthesize
from mmfed.errors import UsageError
from mmfed.ml.features import encode, pooled_schema

FOLDERS = ("site-1", "site-2", "holdout")


def settings(seed: int, **kw: object) -> SynthSettings:
    return SynthSettings(sites=2, patients_per_site=40, holdout=30, genes=40, image_size=32,
                         seed=seed, **kw)  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("synth") / "seed7"
    return root, synthesize(root, settings(7))


@pytest.fixture(scope="module")
def fed_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "seed7-again"
    synthesize(root, settings(7))
    return root


@pytest.fixture(scope="module")
def fed_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "seed8"
    synthesize(root, settings(8))
    return root


# --------------------------------------------------------------------------- determinism


def test_layout(fed: tuple[Path, dict[str, object]]) -> None:
    root, _ = fed
    assert sorted(p.name for p in root.iterdir()) == sorted(["README.txt", "cohort.json", *FOLDERS])
    for name in FOLDERS:
        folder = root / name
        assert (folder / "records.csv").is_file()
        assert (folder / "genomics.csv").is_file()
        assert (folder / "site.toml").is_file()
        assert any((folder / "images").glob("*.png"))


def test_same_seed_is_byte_identical(fed: tuple[Path, dict[str, object]],
                                     fed_again: Path) -> None:
    a, b = tree(fed[0]), tree(fed_again)
    assert a.keys() == b.keys()
    assert any(k.endswith(".png") for k in a)
    differing = [k for k in a if a[k] != b[k]]
    assert differing == []


def test_different_seed_differs(fed: tuple[Path, dict[str, object]], fed_other: Path) -> None:
    a, b = tree(fed[0]), tree(fed_other)
    for name in FOLDERS:
        for fname in ("records.csv", "genomics.csv"):
            assert a[f"{name}/{fname}"] != b[f"{name}/{fname}"], f"{name}/{fname}"
        common = sorted(k for k in a if k.startswith(f"{name}/images/") and k in b)
        assert common
        assert any(a[k] != b[k] for k in common)
    assert json.loads(a["cohort.json"])["seed"] == 7
    assert json.loads(b["cohort.json"])["seed"] == 8


# --------------------------------------------------------------------------- validity


def test_every_folder_reads_clean(fed: tuple[Path, dict[str, object]]) -> None:
    root, cohort = fed
    sizes = {}
    ids: set[str] = set()
    for name in FOLDERS:
        result = read_site(root / name)
        assert result.problems == [], (name, result.problems)
        site = result.site
        assert site is not None
        assert site.name == name
        assert site.spec.synthetic
        assert site.images is not None and site.genomics is not None
        assert site.images.shape[1:] == (1, 32, 32)
        assert len(site.genes) == 40
        assert set(np.unique(site.labels)) <= {0, 1}
        assert not ids & set(site.ids), "patient ids must be unique across folders"
        ids |= set(site.ids)
        sizes[name] = len(site)
    reported = {s["name"]: s["patients"] for s in cohort["sites"]}  # type: ignore[attr-defined]
    assert reported == {"site-1": sizes["site-1"], "site-2": sizes["site-2"]}
    assert sizes["holdout"] == 30
    assert sizes["site-1"] != sizes["site-2"]  # hospitals are not equal in size
    assert sizes["site-1"] + sizes["site-2"] == pytest.approx(80, abs=2)


def test_synthetic_sites_have_gaps_but_encode_finite(
        fed: tuple[Path, dict[str, object]]) -> None:
    root, _ = fed
    sites = [read_site(root / name).site for name in FOLDERS[:2]]
    assert all(s is not None for s in sites)
    schema = pooled_schema(list(sites))  # type: ignore[arg-type]
    gaps = 0
    for site in sites:
        assert site is not None
        gaps += int(np.isnan(site.numeric).sum())
        enc = encode(site, schema)
        for arr in (enc.num, enc.num_missing, enc.image, enc.genomics, enc.mask):
            assert np.isfinite(arr).all()
        assert enc.num_missing.sum() == np.isnan(site.numeric).sum()
    assert gaps > 0  # the records do have missing values to survive


def test_patient_missing_zero_gives_every_modality(tmp_path: Path) -> None:
    synthesize(tmp_path / "fed", settings(3, patient_missing={"images": 0.0,
                                                              "genomics": 0.0}))
    for name in FOLDERS:
        site = read_site(tmp_path / "fed" / name).site
        assert site is not None
        assert site.image_mask.all()
        assert site.genomics_mask.all()


def test_site_missing_removes_a_modality(tmp_path: Path) -> None:
    cohort = synthesize(tmp_path / "fed", settings(5, site_missing={"site-2": {"genomics"}}))
    site2 = tmp_path / "fed" / "site-2"
    assert not (site2 / "genomics.csv").exists()
    toml = tomllib.loads((site2 / "site.toml").read_text(encoding="utf-8"))
    assert toml["modalities"]["genomics"] is False
    assert toml["modalities"]["images"] is True
    result = read_site(site2)
    assert result.problems == []
    assert result.site is not None and result.site.genomics is None
    assert (tmp_path / "fed" / "site-1" / "genomics.csv").exists()
    assert (tmp_path / "fed" / "holdout" / "genomics.csv").exists()
    sites = cohort["sites"]
    assert isinstance(sites, list)
    assert sites[1]["modalities"] == ["images", "records"]
    assert sites[0]["modalities"] == ["genomics", "images", "records"]


# --------------------------------------------------------------------------- labelling


def test_cohort_json_says_synthetic(fed: tuple[Path, dict[str, object]]) -> None:
    root, cohort = fed
    on_disk = json.loads((root / "cohort.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(cohort))
    assert on_disk["synthetic"] is True
    assert "SYNTHETIC" in on_disk["note"]
    disease = on_disk["disease_module_genes"]
    assert isinstance(disease, list) and disease
    header = (root / "site-1" / "genomics.csv").read_text().splitlines()[0].split(",")
    assert set(disease) <= set(header[1:])
    assert not set(disease) & set(on_disk["other_module_genes"])
    assert "SYNTHETIC" in (root / "README.txt").read_text()


def test_site_toml_says_synthetic(fed: tuple[Path, dict[str, object]]) -> None:
    root, _ = fed
    for name in FOLDERS:
        text = (root / name / "site.toml").read_text(encoding="utf-8")
        assert "synthetic = true" in text.splitlines()
        spec, problems = parse_site_spec(root / name / "site.toml")
        assert problems == []
        assert spec is not None and spec.synthetic is True


# --------------------------------------------------------------------------- refusals


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="not empty"):
        synthesize(out, settings(1))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize(empty, settings(1))  # an existing empty folder is fine
    assert (empty / "cohort.json").exists()


def test_refuses_too_small_settings(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        synthesize(tmp_path / "a", SynthSettings(sites=2, patients_per_site=10, holdout=30,
                                                 genes=40, image_size=32))
    with pytest.raises(UsageError):
        synthesize(tmp_path / "b", SynthSettings(sites=0, patients_per_site=40, holdout=30,
                                                 genes=40, image_size=32))


def test_parse_missing() -> None:
    assert parse_missing([], 3) == {}
    assert parse_missing(["genomics@site-2", "images@2", "images@site-3"], 3) == {
        "site-2": {"genomics", "images"}, "site-3": {"images"}}
    for bad in ("foo@site-1", "records@site-1", "genomics", "genomics@site-9",
                "genomics@9", "images@site-0", "images@"):
        with pytest.raises(UsageError):
            parse_missing([bad], 3)
    with pytest.raises(UsageError, match="site-9"):
        parse_missing(["genomics@site-9"], 3)
    with pytest.raises(UsageError, match="foo@site-1"):
        parse_missing(["foo@site-1"], 3)


def test_cli_synth_bad_missing_is_one_line_exit_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "synth", "--out", str(tmp_path / "fed"), "--sites", "3",
                 "--missing", "genomics@site-9"])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("mmfed: error: ")
    assert "Traceback" not in out + err
    assert not (tmp_path / "fed").exists()
