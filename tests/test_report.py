"""The HTML run report, rendered from real runs (federated, DP, centralized baseline).

One tiny synthetic cohort is shared by all runs so that the baseline comparison is
like-for-like; the centralized run needs no Flower simulation and runs alongside the
federated one to keep the module's set-up time down.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmfed.errors import DataError
from tests.helpers import MMFED, QUIET, run_mmfed

pytestmark = pytest.mark.slow

ALL_SECTIONS = ("summary", "performance", "privacy", "participation", "communication",
                "holdout", "explanations", "baseline")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("metrics.jsonl", "summary.json", "config.toml", "model.pt")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13, f"{path.name}: first chunk is not IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


class Page(HTMLParser):
    """Sections (id -> text, h2 titles), images per section, and every src/href."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.h2: dict[str, str] = {}
        self.images: list[tuple[str | None, str]] = []
        self.alts: dict[str, str] = {}
        self.refs: list[str] = []
        self.tags: set[str] = set()
        self._section: str | None = None
        self._in_h2 = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "section":
            assert a.get("id"), "every section has an id"
            assert a["id"] not in self.text, f"duplicate section id {a['id']}"
            self._section = a["id"]
            self.text[self._section] = ""
        elif tag == "h2":
            self._in_h2 = True
        elif tag == "img":
            self.images.append((self._section, a.get("src") or ""))
            self.alts[a.get("src") or ""] = a.get("alt") or ""

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._section is not None:
            self.text[self._section] += data
            if self._in_h2:
                self.h2[self._section] = self.h2.get(self._section, "") + data


def parse(index: Path) -> Page:
    return Page(index.read_text(encoding="utf-8"))


def copy_run(src: Path, dst: Path) -> Path:
    """The run's own files only; config.toml still points at the shared data folder."""
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    data = root / "data"
    proc = run_mmfed("data", "synth", "--out", data, "--sites", "3", "--patients-per-site",
                     "60", "--holdout", "80", "--genes", "100", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    central = subprocess.Popen(
        [*MMFED, "centralized", "--data", str(data), "--out", str(root / "central"),
         "--set", "rounds=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **QUIET})
    try:
        proc = run_mmfed("simulate", "--data", data, "--rounds", "3", "--out", root / "fed",
                         "--no-progress", "--no-dp", timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = run_mmfed("simulate", "--data", data, "--rounds", "2", "--out", root / "dp",
                         "--no-progress", "--dp", "--set",
                         f"privacy.ledger_dir={root / 'ledger'}", timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _, err = central.communicate(timeout=400)
    finally:
        if central.poll() is None:
            central.kill()
            central.communicate()
    assert central.returncode == 0, err[-3000:]
    return {"fed": root / "fed", "dp": root / "dp", "central": root / "central"}


@pytest.fixture(scope="module")
def reports(runs: dict[str, Path]) -> dict[str, Path]:
    from mmfed.report import render_report

    return {"fed": render_report(runs["fed"], runs["central"]),
            "dp": render_report(runs["dp"]),
            "central": render_report(runs["central"])}


def test_index_location_and_every_section(runs: dict[str, Path],
                                          reports: dict[str, Path]) -> None:
    index = reports["fed"]
    assert index == runs["fed"] / "report" / "index.html"
    page = parse(index)
    assert tuple(page.text) == ALL_SECTIONS
    for sid in ALL_SECTIONS:
        assert page.h2.get(sid, "").strip(), f"section {sid} has no <h2>"
    assert "baseline" not in parse(reports["dp"]).text  # only when a baseline is given
    assert tuple(parse(reports["central"]).text) == ALL_SECTIONS[:-1]


@pytest.mark.parametrize("which", ["fed", "dp", "central"])
def test_every_image_is_a_sensible_png(reports: dict[str, Path], which: str) -> None:
    index = reports[which]
    page = parse(index)
    assert page.images
    for section, src in page.images:
        assert section is not None, f"{src}: image outside a section"
        assert "/" not in src and "\\" not in src and ":" not in src, src
        width, height = png_size(index.parent / src)
        assert 200 <= width <= 3000 and 200 <= height <= 3000, (src, width, height)
    # Every PNG on disk is referenced: nothing stale, nothing orphaned.
    assert {src for _, src in page.images} == {p.name for p in index.parent.glob("*.png")}
    sections_with_images = {s for s, _ in page.images}
    assert {"performance", "privacy", "participation", "communication",
            "holdout"} <= sections_with_images


@pytest.mark.parametrize("which", ["fed", "dp", "central"])
def test_page_is_self_contained(reports: dict[str, Path], which: str) -> None:
    text = reports[which].read_text(encoding="utf-8")
    page = Page(text)
    assert "http://" not in text and "https://" not in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "<style>" in text
    for ref in page.refs:
        assert ref.startswith("#") or (ref.endswith(".png") and "/" not in ref), ref


def test_privacy_section_plots_epsilon_for_a_dp_run(runs: dict[str, Path],
                                                    reports: dict[str, Path]) -> None:
    page = parse(reports["dp"])
    text = page.text["privacy"]
    assert "ON" in text and "was off" not in text.lower()
    imgs = [src for s, src in page.images if s == "privacy"]
    assert imgs == ["privacy_epsilon.png"]
    # The table shows each site's final ε as reported in summary.json.
    summary = json.loads((runs["dp"] / "summary.json").read_text())
    for site, info in summary["sites"].items():
        assert site in text
        assert f"{info['epsilon']:.3f}" in text
    assert "budget" in text
    assert "budget dashed" in page.alts["privacy_epsilon.png"]


@pytest.mark.parametrize("which", ["fed", "central"])
def test_privacy_section_says_dp_was_off(reports: dict[str, Path], which: str) -> None:
    page = parse(reports[which])
    text = page.text["privacy"]
    assert "differential privacy was off" in text.lower()
    imgs = [src for s, src in page.images if s == "privacy"]
    assert imgs == ["privacy_epsilon.png"]  # still a PNG, stating it
    png_size(reports[which].parent / imgs[0])
    assert "no ε to plot" in page.alts["privacy_epsilon.png"]


def test_summary_baseline_and_holdout_content(runs: dict[str, Path],
                                             reports: dict[str, Path]) -> None:
    page = parse(reports["fed"])
    summary = json.loads((runs["fed"] / "summary.json").read_text())
    central = json.loads((runs["central"] / "summary.json").read_text())
    assert "federated" in page.text["summary"]
    assert "Secure aggregation" in page.text["summary"]
    assert f"{summary['final']['auroc']:.3f}" in page.text["summary"]
    assert f"{central['final']['auroc']:.3f}" in page.text["baseline"]
    assert [s for s, src in page.images if src == "baseline_auroc.png"] == ["baseline"]
    assert {src for s, src in page.images if s == "holdout"} == {
        "holdout_roc.png", "holdout_confusion.png", "holdout_calibration.png"}


def test_holdout_predictions_reproduce_the_recorded_auroc(runs: dict[str, Path]) -> None:
    from mmfed.report.holdout import evaluate_holdout

    result = evaluate_holdout(runs["fed"])
    summary = json.loads((runs["fed"] / "summary.json").read_text())
    assert result.probs.shape == (80, 2) and len(result.labels) == 80
    assert result.metrics["auroc"] == pytest.approx(summary["final"]["auroc"], abs=1e-6)


def _corrupt_line(run: Path) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"round": 4, "global": {"auroc": 0.5\n')


def _drop(name: str):
    return lambda run: (run / name).unlink()


@pytest.mark.parametrize("corrupt", [
    _corrupt_line,
    _drop("metrics.jsonl"),
    _drop("model.pt"),
    _drop("summary.json"),
    lambda run: (run / "metrics.jsonl").write_text(""),
    lambda run: (run / "metrics.jsonl").write_text('[1, 2]\n'),
    lambda run: (run / "metrics.jsonl").write_text('{"round": 1}\n'),
    lambda run: (run / "model.pt").write_bytes(b"not a torch file"),
    lambda run: (run / "summary.json").write_text("{"),
], ids=["bad-json-line", "no-metrics", "no-model", "no-summary", "empty-metrics",
        "not-an-object", "no-global", "torn-model", "bad-summary"])
def test_corrupt_run_raises_one_line_data_error(runs: dict[str, Path], tmp_path: Path,
                                                corrupt) -> None:
    from mmfed.report import render_report

    run = copy_run(runs["fed"], tmp_path / "run")
    index = render_report(run)  # a good report first: a failed render must keep it
    before = index.read_bytes()
    corrupt(run)
    with pytest.raises(DataError) as info:
        render_report(run)
    assert "\n" not in str(info.value) and str(info.value).strip()
    assert index.read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_missing_run_directory_raises(tmp_path: Path) -> None:
    from mmfed.report import render_report

    with pytest.raises(DataError, match="no such run directory"):
        render_report(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        render_report(tmp_path)


def test_rendering_twice_overwrites_cleanly(runs: dict[str, Path], tmp_path: Path) -> None:
    from mmfed.report import render_report

    run = copy_run(runs["fed"], tmp_path / "run")
    first = render_report(run, runs["central"])
    files = sorted(p.name for p in first.parent.iterdir())
    (first.parent / "stale.png").write_bytes(b"old")
    second = render_report(run, runs["central"])
    assert second == first
    assert sorted(p.name for p in second.parent.iterdir()) == files
    assert sorted(p.name for p in run.iterdir()) == sorted([*RUN_FILES, "report"])
    # Without the baseline, its figure and section go away too.
    third = render_report(run)
    assert "baseline_auroc.png" not in {p.name for p in third.parent.iterdir()}
    assert "baseline" not in parse(third).text


def test_declined_and_dropped_sites_are_listed(runs: dict[str, Path], tmp_path: Path) -> None:
    """A DP run edited so that one site drops and one declines (faults are rare in CI)."""
    from mmfed.report import render_report

    run = copy_run(runs["dp"], tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["sites"]["site-2"] = {"status": "dropped", "reason": "timeout after 900 s"}
    spent = lines[-1]["sites"]["site-3"]["epsilon"]
    lines[-1]["sites"]["site-3"] = {"status": "declined", "epsilon": spent, "delta": 1e-5,
                                    "epsilon_projected": 9.5, "epsilon_budget": 8.0}
    lines[-1]["global"]["auroc"] = None  # undefined figures are JSON null
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    page = parse(render_report(run))
    text = page.text["participation"]
    assert "timeout after 900 s" in text
    assert "declined" in text and "projected" not in text and "ε 9.5 > budget 8" in text
    assert "Every site trained" not in text


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (CI installs Debian's chromium package)")
def test_headless_chromium_renders_the_page(reports: dict[str, Path], tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium is not None
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1280,2000",
           reports["fed"].resolve().as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish in 60 s; stderr: {exc.stderr!r}")
    if proc.returncode != 0 or not shot.is_file():
        print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shot.is_file(), proc.stderr[-3000:]
    width, height = png_size(shot)
    assert width == 1280 and height > 0
