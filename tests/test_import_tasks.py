"""`mmfed data import --task`: regression and survival exports, through the command line.

A survival export names two outcome columns (follow-up time, event) and spells events the
way its EHR does; a regression export holds a number. These tests pin what reaches the
site folder, that a bad outcome value stops the import with one line naming it (and
nothing written), and that flags of another task are refused as usage errors rather than
ignored. Classification without ``--task`` must stay exactly as it was.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mmfed.cli import main
from mmfed.data.reader import read_site
from tests.helpers import run_mmfed


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _import(tmp_path: Path, records: Path, *flags: str, out: str = "site"
            ) -> tuple[int, str, str, Path]:
    site = tmp_path / out
    proc = run_mmfed("data", "import", "--out", site, "--name", "s1", "--records", records,
                     "--id-column", "MRN", *flags, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr, site


SURVIVAL = ("MRN,os_days,dead,age\n"
            "P1,120,1,50\nP2,30.5,0,61\nP3,,1,70\nP4,400,1.0,55\nP5,7,0.0,44\nP6,90,NA,40\n")


def test_survival_import_reads_back_as_survival(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv", SURVIVAL)
    rc, out, err, site = _import(tmp_path, records, "--task", "survival", "--time-column",
                                 "os_days", "--event-column", "dead", "--unit", "days")
    assert rc == 0, out + err
    # Rows without a time (P3) or an event (P6) are dropped with a warning, not refused.
    assert "2 patients without a time in 'os_days' or an event in 'dead' (dropped)" in err
    header = (site / "records.csv").read_text().splitlines()[0]
    assert header == "patient_id,time,event,age"
    spec = tomllib.loads((site / "site.toml").read_text())["task"]
    assert spec == {"kind": "survival", "time": "time", "event": "event", "unit": "days"}

    result = read_site(site)
    assert result.ok, result.problems
    data = result.site
    assert data is not None and data.spec.kind == "survival" and data.spec.unit == "days"
    assert data.ids == ["P1", "P2", "P4", "P5"]
    assert data.targets is not None
    np.testing.assert_allclose(data.targets, [120.0, 30.5, 400.0, 7.0])
    assert data.labels.tolist() == [1, 0, 1, 0]
    assert data.numeric_cols == ["age"]  # the outcome never becomes a feature

    report = json.loads((site / "import.json").read_text())
    assert report["settings"]["task"] == "survival"
    assert report["settings"]["time_column"] == "os_days"
    assert report["settings"]["event_column"] == "dead"
    assert report["settings"]["unit"] == "days"
    assert report["records"]["dropped_no_label"] == 2
    assert report["records"]["events"] == 2


def test_survival_event_words_are_mapped(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv",
                   "MRN,time,death\nP1,10,yes\nP2,20,No\nP3,30,TRUE\nP4,40,false\n")
    rc, out, err, site = _import(tmp_path, records, "--task", "survival", "--time-column",
                                 "time", "--event-column", "death")
    assert rc == 0, out + err
    rows = (site / "records.csv").read_text().splitlines()
    assert rows == ["patient_id,time,event", "P1,10,1", "P2,20,0", "P3,30,1", "P4,40,0"]
    result = read_site(site)
    assert result.ok and result.site is not None
    assert result.site.labels.tolist() == [1, 0, 1, 0]
    assert "unit" not in tomllib.loads((site / "site.toml").read_text())["task"]


def test_negative_time_stops_the_import_with_one_line(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv", "MRN,os,dead\nP1,10,1\nP2,-3,0\nP3,5,1\n")
    rc, out, err, site = _import(tmp_path, records, "--task", "survival", "--time-column",
                                 "os", "--event-column", "dead")
    assert rc == 1
    lines = out.strip().splitlines()
    assert lines == ["problem: ehr.csv: survival time in 'os' must be a number > 0 at "
                     "line 3 ('-3')"]
    assert err.strip().splitlines() == [f"mmfed data import: 1 problem(s); nothing was "
                                        f"written to {site}"]
    assert not site.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ehr.csv"]  # no work folder left


def test_bad_event_and_non_numeric_time_listed(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv", "MRN,os,dead\nP1,ten,1\nP2,0,2\nP3,5,maybe\n")
    rc, out, _, site = _import(tmp_path, records, "--task", "survival", "--time-column",
                               "os", "--event-column", "dead")
    assert rc == 1 and not site.exists()
    assert "survival time in 'os' must be a number > 0 at line 2 ('ten'), line 3 ('0')" in out
    assert "event in 'dead' must be 1/0, true/false or yes/no" in out
    assert "line 3 ('2'), line 4 ('maybe')" in out


def test_regression_import(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv",
                   "MRN,hba1c,age\nP1,5.5,50\nP2, 7.25 ,60\nP3,,70\nP4,-1e-1,40\n")
    rc, out, err, site = _import(tmp_path, records, "--task", "regression", "--label",
                                 "hba1c", "--unit", "%")
    assert rc == 0, out + err
    assert "1 patient without a label in 'hba1c' (dropped)" in err
    spec = tomllib.loads((site / "site.toml").read_text())["task"]
    assert spec == {"kind": "regression", "label": "label", "unit": "%"}
    result = read_site(site)
    assert result.ok, result.problems
    assert result.site is not None and result.site.spec.kind == "regression"
    assert result.site.targets is not None
    np.testing.assert_allclose(result.site.targets, [5.5, 7.25, -0.1])
    settings = json.loads((site / "import.json").read_text())["settings"]
    assert settings["task"] == "regression" and settings["label"] == "hba1c"
    assert "classes" not in settings


def test_non_numeric_regression_label_refused(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv", "MRN,y\nP1,1.5\nP2,\"1,5\"\nP3,inf\nP4,2\n")
    rc, out, _, site = _import(tmp_path, records, "--task", "regression", "--label", "y")
    assert rc == 1 and not site.exists()
    assert out.strip().splitlines() == [
        "problem: ehr.csv: regression label in 'y' must be a finite number at line 3 "
        "('1,5'), line 4 ('inf')"]


@pytest.mark.parametrize(("flags", "needle"), [
    (("--task", "regression", "--label", "os_days", "--classes", "1,2"), "--classes"),
    (("--task", "survival", "--time-column", "os_days"), "--event-column"),
])
def test_flags_of_another_task_are_usage_errors(tmp_path: Path, flags: tuple[str, ...],
                                                needle: str) -> None:
    records = _csv(tmp_path / "ehr.csv", SURVIVAL)
    rc, out, err, site = _import(tmp_path, records, *flags)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not site.exists()


def test_every_task_flag_mistake_is_one_usage_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """In process (the checks run before any file is read): each mistake exits 2 with
    one line that names the flag at fault."""
    records = _csv(tmp_path / "ehr.csv", SURVIVAL)
    site = tmp_path / "site"
    cases = [
        (("--task", "survival", "--event-column", "dead"), "--time-column"),
        (("--task", "survival", "--time-column", "os_days", "--event-column", "dead",
          "--label", "dead"), "--label"),
        (("--task", "survival", "--time-column", "os_days", "--event-column", "dead",
          "--classes", "0,1"), "--classes"),
        (("--task", "survival", "--time-column", "dead", "--event-column", "dead"),
         "--time-column and --event-column name the same column 'dead'"),
        (("--task", "survival", "--time-column", "MRN", "--event-column", "dead"),
         "--id-column and --time-column name the same column 'MRN'"),
        (("--task", "regression",), "needs --label"),
        (("--task", "regression", "--label", "MRN"), "--id-column and --label"),
        (("--label", "dead", "--time-column", "os_days"), "--time-column"),
        (("--label", "dead", "--unit", "days"), "--unit"),
        (("--task", "regression", "--label", "os_days", "--unit", " "), "--unit"),
        (("--label", "MRN",), "--id-column and --label name the same column 'MRN'"),
        (("--task", "cox", "--label", "dead"), "invalid choice"),
    ]
    for flags, needle in cases:
        rc = _in_process(site, records, flags)
        err = capsys.readouterr().err
        assert rc == 2, (flags, err)
        assert needle in err and len(err.strip().splitlines()) <= 2, (flags, err)
        assert not site.exists()


def _in_process(site: Path, records: Path, flags: tuple[str, ...]) -> int:
    """The exit status of ``mmfed data import`` run in this process; argparse's own
    refusals (an unknown --task) arrive as SystemExit."""
    try:
        return main(["data", "import", "--out", str(site), "--name", "s1", "--records",
                     str(records), "--id-column", "MRN", *flags])
    except SystemExit as exc:
        return int(exc.code or 0)


def test_classification_default_unchanged(tmp_path: Path) -> None:
    records = _csv(tmp_path / "ehr.csv", "MRN,relapse,age\nP1,yes,50\nP2,no,60\nP3,yes,61\n")
    rc, out, err, site = _import(tmp_path, records, "--label", "relapse")
    assert rc == 0, out + err
    task = tomllib.loads((site / "site.toml").read_text())["task"]
    assert task == {"label": "label", "classes": ["no", "yes"]}
    result = read_site(site)
    assert result.ok and result.site is not None
    assert result.site.spec.kind == "classification"
    assert result.site.labels.tolist() == [1, 0, 1]
    settings = json.loads((site / "import.json").read_text())["settings"]
    assert settings["task"] == "classification"
    assert settings["label"] == "relapse" and settings["classes"] == ["no", "yes"]
