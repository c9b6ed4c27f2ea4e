"""``render_report``: one self-contained HTML page describing a finished run.

A run directory holds everything a reviewer needs (per-round metrics, privacy spend,
participation, the final model) but as JSON lines and a torch file; the report turns it
into a page that can be opened offline from a file share: ``RUN/report/index.html``
with its PNG figures next to it.

Everything is validated and the holdout evaluated *before* anything is written, and the
new report is built in a temporary folder and swapped in, so a failed render leaves the
previous report intact and a repeated render leaves no stale figures behind.

The saved model's task (classification, regression or survival) is handed to every
section that names figures, so each kind of run is reported in its own metrics.

Heavy imports (matplotlib, torch) happen inside ``render_report`` so that importing
this package (e.g. from the CLI's parser) stays cheap.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPORT_DIR = "report"
INDEX = "index.html"
SECTION_IDS = ("summary", "performance", "privacy", "participation", "communication",
               "holdout", "explanations", "baseline")

__all__ = ["INDEX", "REPORT_DIR", "SECTION_IDS", "render_report"]


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``; the old report is moved aside, then deleted."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.is_dir() and not final.is_symlink():
        final.rename(old)
    elif final.exists() or final.is_symlink():
        final.unlink()
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def render_report(run: Path, baseline: Path | None = None) -> Path:
    """Write ``RUN/report/index.html`` plus its PNGs and return the index path.

    ``baseline`` (usually a ``mmfed centralized`` run on the same data) adds a comparison
    section. Raises ``mmfed.errors.DataError`` for a missing or corrupt run directory.
    """
    from mmfed.report import sections
    from mmfed.report.holdout import evaluate_holdout
    from mmfed.report.html import page
    from mmfed.report.rundata import load_run

    run = Path(run)
    data = load_run(run)
    base = load_run(baseline) if baseline is not None else None
    holdout = evaluate_holdout(run)

    final = run / REPORT_DIR
    tmp = run / f".{REPORT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        parts = [
            sections.summary_section(data, holdout),
            sections.performance_section(data, tmp, holdout.task),
            sections.privacy_section(data, tmp),
            sections.participation_section(data, tmp),
            sections.communication_section(data, tmp),
            sections.holdout_section(holdout, data, tmp),
            sections.explanations_section(run, tmp),
        ]
        if base is not None:
            parts.append(sections.baseline_section(data, base, tmp, holdout.task))
        html = page(f"mmfed run report: {run.resolve().name}", sections.subtitle(data), parts)
        (tmp / INDEX).write_text(html, encoding="utf-8")
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / INDEX
