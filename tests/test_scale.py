"""Many sites per simulation worker: the bounded site cache, fast genomics parsing, and
a 12-site federation on 2 workers where every site must train on its own data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmfed.data import reader
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.ml.features import pooled_schema, split_indices
from mmfed.privacy import ledger
from mmfed.site import state as site_state
from tests.helpers import run_mmfed


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    synthesize(root, SynthSettings(sites=3, patients_per_site=30, holdout=20, seed=5,
                                   genes=50, patient_missing={"images": 0.2,
                                                              "genomics": 0.2}))
    return root


def test_block_genomics_parse_equals_the_per_column_parse(cohort: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    site = cohort / "site-1"
    rows = list(csv.reader((site / "genomics.csv").open()))
    rows[1][3], rows[2][4], rows[3][5] = "", " NA ", " 1.5e1 "  # gaps and padding
    with (site / "genomics.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    fast = reader.load_site(site)
    monkeypatch.setattr(reader, "_to_float_block", lambda frame: None)
    slow = reader.load_site(site)
    assert fast.genomics is not None and slow.genomics is not None
    np.testing.assert_array_equal(fast.genomics, slow.genomics)  # NaN == NaN here
    assert np.isnan(fast.genomics).sum() >= 2
    assert 15.0 in fast.genomics


@pytest.mark.parametrize("cell", ["high", "1_000", "١٢", "inf"])
def test_cells_the_block_parse_must_not_accept_still_get_named(cohort: Path, tmp_path: Path,
                                                               cell: str) -> None:
    site = tmp_path / "site"
    shutil.copytree(cohort / "site-2", site)
    rows = list(csv.reader((site / "genomics.csv").open()))
    rows[2][7] = cell
    with (site / "genomics.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    problems = reader.read_site(site).problems
    assert any(f"line 3 column '{rows[0][7]}'" in p for p in problems), problems


def test_site_cache_keeps_recent_sites_within_its_byte_bound(cohort: Path,
                                                             tmp_path: Path) -> None:
    folders = [Path(shutil.copytree(cohort / f"site-{i}", tmp_path / f"site-{i}"))
               for i in (1, 2, 3)]
    sizes = [site_state.nbytes(reader.load_site(f)) for f in folders]
    assert min(sizes) > 0
    state = site_state.SiteState(max_bytes=sum(sizes) - 1)  # room for two
    for folder in folders:
        state.open(folder)
    assert state.cached_sites() == ["site-2", "site-3"]  # least recently used went first
    kept = state.open(folders[1])
    assert state.open(folders[1]).data is kept.data  # a hit: no reload...
    state.open(folders[0])  # ...and it is now the most recent
    assert state.cached_sites() == ["site-2", "site-1"]
    # Changed data is re-read under its new fingerprint, and its stale copy is dropped.
    with (folders[1] / "site.toml").open("a") as fh:
        fh.write("# edited\n")
    after = state.open(folders[1])
    assert after.data is not kept.data and after.fingerprint != kept.fingerprint
    assert state.cached_sites().count("site-2") == 1


def test_site_state_is_keyed_by_the_ledger_fingerprint_hashed_once_per_change(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(shutil.copytree(cohort / "site-3", tmp_path / "here"))
    hashed: list[Path] = []
    original = ledger.site_fingerprint

    def counting(where: Path | str) -> str:
        hashed.append(Path(where))
        return original(where)

    monkeypatch.setattr("mmfed.privacy.ledger.site_fingerprint", counting)
    state = site_state.SiteState()
    first = state.open(folder)
    assert first.fingerprint == original(folder)  # the privacy ledger's key
    assert state.open(folder).data is first.data and len(hashed) == 1  # not hashed again
    # The same data under another folder name is the same entry, not a second copy.
    moved = Path(shutil.copytree(folder, tmp_path / "there"))
    assert state.open(moved).data is first.data and len(hashed) == 2
    schema = pooled_schema([first.data])
    train, val = state.splits(first, schema, 0.2, 0)
    assert state.splits(state.open(moved), schema, 0.2, 0)[0] is train
    assert len(train) + len(val) == len(first.data)


@pytest.mark.slow
def test_twelve_sites_on_two_workers_each_train_on_their_own_data(tmp_path: Path) -> None:
    """More sites than workers, SecAgg+ neighbourhoods: every site trains, and each
    reports its own training-set size (a worker serving several sites mixes none up)."""
    out = tmp_path / "run"
    proc = run_mmfed("simulate", "--sites", "12", "--rounds", "1", "--out", out,
                     "--no-progress", "--no-dp", "--set", "data.patients_per_site=20",
                     "--set", "data.holdout=20", "--set", "data.genes=50",
                     "--set", "secagg.neighbours=4", "--set", "federation.local_eval=false",
                     "--set", "simulation.cpus_per_site=1.0", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["aggregation"]["participants"] == 12
    assert line["aggregation"]["neighbours"] == 4 and line["aggregation"]["secure"]
    expected = {}
    for folder in sorted((out / "data").glob("site-*")):
        site = reader.load_site(folder)
        train, _ = split_indices(site.ids, site.labels, 0.15, 0)
        expected[site.name] = len(train)
    assert len(set(expected.values())) > 1  # sizes differ, so a mix-up would show
    assert {name: entry["status"] for name, entry in line["sites"].items()} == dict.fromkeys(
        expected, "trained")
    assert {name: entry["num_examples"] for name, entry in line["sites"].items()} == expected
