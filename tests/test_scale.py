"""Many sites per simulation worker: the bounded site cache, fast genomics parsing, and
a 12-site federation on 2 workers where every site must train on its own data."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfed.config import RunConfig
from mmfed.data import reader
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.errors import DataError, MmfedError
from mmfed.ml.features import pooled_schema, split_indices
from mmfed.privacy import ledger
from mmfed.site import runtime
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


def test_plain_csv_reads_as_pandas_does_and_leaves_the_rest_to_pandas(cohort: Path) -> None:
    def pandas(text: str) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=False,
                           na_filter=False, skipinitialspace=False)

    site = cohort / "site-2"
    plain = [(site / name).read_text() for name in ("genomics.csv", "records.csv")]
    plain += ["id,a,b\n001, 1.5 ,\n002,,NA\n",  # padding, empty cells, ids as text
              "id,a\r\n1,2\r\n3,4",  # CRLF, no final newline
              " id ,a\n1,x\n"]  # a padded header (stripped later, as pandas' is)
    for text in plain:
        fast = reader._plain_csv(text)
        assert fast is not None
        pd.testing.assert_frame_equal(fast, pandas(text))
    for text in ('id,a\n1,"2,3"\n',  # quotes
                 "id,a\n1,2\n\n3,4\n",  # a blank line
                 "id,a\n1,2,3\n",  # a row wider than the header
                 "id,a,b\n1,2\n",  # a narrower one
                 "id,a\n"):  # no rows
        assert reader._plain_csv(text) is None
    # and a malformed file still gets pandas' explanation, in one line
    (site / "bad.csv").write_text("id,a\n1,2\n3,4,5\n")
    problems: list[str] = []
    assert reader._read_csv(site / "bad.csv", problems) is None
    assert len(problems) == 1 and problems[0].startswith("bad.csv: malformed CSV (")


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
    kept_data = kept.data
    assert state.open(folders[1]).data is kept_data  # a hit: no reload...
    assert state.open(folders[0]).data.name == "site-1"  # ...and site-1 is the most recent
    assert state.cached_sites() == ["site-2", "site-1"]
    # Changed data is re-read under its new fingerprint, and its stale copy is dropped.
    with (folders[1] / "site.toml").open("a") as fh:
        fh.write("# edited\n")
    after = state.open(folders[1])
    assert after.data is not kept_data and after.fingerprint != kept.fingerprint
    assert state.cached_sites().count("site-2") == 1
    # A site opened before the change and read after it (its data is read when first
    # used) refuses: what it would read is not what its fingerprint names.
    stale = state.open(folders[2])
    state._sites.discard([stale.fingerprint])  # as if evicted meanwhile
    with (folders[2] / "site.toml").open("a") as fh:
        fh.write("# edited\n")
    with pytest.raises(MmfedError, match="changed while a message was answered"):
        _ = stale.data
    assert state.open(folders[2]).data.name == "site-3"  # the next message reads it


def test_a_site_whose_splits_are_held_is_not_read_again(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Site data and encoded splits have separate bounds: with room for every site's
    splits but for one site's data, a second pass over the sites reads none of them
    (the case of a simulation worker that answers for hundreds of sites)."""
    folders = [Path(shutil.copytree(cohort / f"site-{i}", tmp_path / f"site-{i}"))
               for i in (1, 2, 3)]
    reads: list[Path] = []
    original = reader.load_site

    def counting(folder: Path | str) -> reader.SiteData:
        reads.append(Path(folder))
        return original(folder)

    monkeypatch.setattr(reader, "load_site", counting)
    state = site_state.SiteState(max_bytes=1, split_bytes=2**30)  # data: the newest only
    schema = pooled_schema([original(f) for f in folders])
    first = [state.splits(state.open(f), schema, 0.2, 0) for f in folders]
    assert reads == folders  # each read once, for its name and its splits
    again = [state.splits(state.open(f), schema, 0.2, 0) for f in folders]
    assert reads == folders  # no read at all: the splits were held
    assert all(a[0] is b[0] for a, b in zip(first, again, strict=True))
    assert [state.open(f).name for f in folders] == ["site-1", "site-2", "site-3"]
    assert len(reads) == 3
    assert state.open(folders[0]).data.name == "site-1"  # asked for: read now
    assert len(reads) == 4
    # the other way round, room for one site's splits: every pass encodes again
    small = site_state.SiteState(split_bytes=1)
    held = [small.splits(small.open(f), schema, 0.2, 0)[0] for f in folders]
    assert small.splits(small.open(folders[0]), schema, 0.2, 0)[0] is not held[0]


def test_simulated_sites_are_listed_once_until_the_federation_folder_changes(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fed"
    for i in (1, 2, 3):
        shutil.copytree(cohort / f"site-{i}", root / f"site-{i}")
    listed: list[Path] = []
    original = reader.list_sites

    def counting(where: Path | str) -> list[Path]:
        listed.append(Path(where))
        return original(where)

    monkeypatch.setattr(reader, "list_sites", counting)
    cfg = RunConfig.load(None, None, {"data.dir": str(root)})
    where = [runtime.resolve_site_dir({"partition-id": pid}, cfg).name for pid in (0, 1, 2, 0)]
    assert where == ["site-1", "site-2", "site-3", "site-1"] and len(listed) == 1
    # a site folder added: listed again, and the new partition id resolves
    shutil.copytree(cohort / "site-1", root / "site-4")
    assert runtime.resolve_site_dir({"partition-id": 3}, cfg).name == "site-4"
    assert len(listed) == 2
    # a listed folder that lost its site.toml is listed again, and the ids move on
    (root / "site-2" / "site.toml").unlink()
    assert runtime.resolve_site_dir({"partition-id": 1}, cfg).name == "site-3"
    with pytest.raises(DataError, match=r"partition-id 3 but .* only 3 site folders"):
        runtime.resolve_site_dir({"partition-id": 3}, cfg)


def test_split_cache_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.delenv(site_state.SPLIT_CACHE_ENV, raising=False)
    assert site_state.split_cache_bytes() == site_state.CACHE_BYTES
    monkeypatch.setenv(site_state.SPLIT_CACHE_ENV, "1024")
    assert site_state.split_cache_bytes() == 2**30
    for bad in ("0", "-5", "1.5", "lots"):
        monkeypatch.setenv(site_state.SPLIT_CACHE_ENV, bad)
        assert site_state.split_cache_bytes() == site_state.CACHE_BYTES  # never fails
        # mmfed simulate refuses it in one line, before Ray starts
        proc = run_mmfed("simulate", "--rounds", "1")  # the environment set above
        assert proc.returncode == 2 and site_state.SPLIT_CACHE_ENV in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


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
