"""Reading and checking a run directory before anything is drawn from it.

A report is read by people deciding whether a federated model can be trusted, so a
torn or foreign run directory must stop the report with one clear line rather than
produce a page of empty plots that looks like a bad model. Everything here is plain
JSON/TOML parsing: no torch, no matplotlib, so it is cheap to validate first.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfed.errors import DataError
from mmfed.ml.task import KINDS, kind_of_metrics

STATUSES = ("trained", "declined", "dropped")
# Dict-valued parts of a metrics line; any of them may be absent in older or
# centralized runs, but if present they must be JSON objects.
_OPTIONAL_OBJECTS = ("sites", "aggregation", "bytes", "seconds")


def number(value: Any) -> float:
    """A JSON value as a float; null, text and booleans become NaN so plots show a gap."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort site-2 before site-10, as the rest of mmfed lists sites."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML tables to the dotted keys RunConfig uses (``[data] dir`` -> ``data.dir``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (corrupt run directory?)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Per-round lines sorted by round; a repeated round keeps its last line (a resume)."""
    if not path.is_file():
        raise DataError(f"{path.parent}: no metrics.jsonl (not a run directory, or the run "
                        "never finished a round)")
    by_round: dict[int, dict[str, Any]] = {}
    for lineno, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(line, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(line).__name__}")
        rnd = line.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise DataError(f"{where}: 'round' must be a non-negative integer, got {rnd!r}")
        if not isinstance(line.get("global"), dict):
            raise DataError(f"{where}: 'global' figures missing or not an object")
        for key in _OPTIONAL_OBJECTS:
            if key in line and not isinstance(line[key], dict):
                raise DataError(f"{where}: '{key}' is not an object")
        for name, entry in line.get("sites", {}).items():
            if not isinstance(entry, dict):
                raise DataError(f"{where}: site '{name}' entry is not an object")
        by_round[rnd] = line
    if not by_round:
        raise DataError(f"{path}: no rounds recorded")
    return [by_round[r] for r in sorted(by_round)]


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path.parent}: no summary.json (the run did not finish)")
    try:
        summary = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in ("final", "sites"):
        if key in summary and summary[key] is not None and not isinstance(summary[key], dict):
            raise DataError(f"{path}: '{key}' is not an object")
    return summary


def _read_config(path: Path) -> dict[str, Any]:
    """The resolved config; optional, because model.pt carries the same values."""
    if not path.is_file():
        return {}
    try:
        return _flatten(tomllib.loads(_read_text(path)))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from None


@dataclass(frozen=True)
class RunData:
    """One run directory's history, validated; accessors turn nulls into NaN."""

    path: Path
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def mode(self) -> str:
        mode = self.summary.get("mode")
        if isinstance(mode, str) and mode:
            return mode
        return "federated" if self.site_names else "centralized"

    @property
    def federated(self) -> bool:
        return self.mode != "centralized"

    @property
    def round_numbers(self) -> list[int]:
        return [int(line["round"]) for line in self.rounds]

    @property
    def site_names(self) -> list[str]:
        names = set(self.summary_sites)
        for line in self.rounds:
            names.update(line.get("sites", {}))
        return sorted(names, key=natural_key)

    @property
    def final(self) -> dict[str, Any]:
        """Final global figures: the summary's, else the last round's."""
        final = self.summary.get("final")
        return final if isinstance(final, dict) and final else self.rounds[-1]["global"]

    @property
    def kind(self) -> str:
        """The task the run trained: summary.json's ``task`` where the run wrote one, else
        read off the figures' keys (each kind logs its own), so that a report of a run
        whose model cannot be loaded still names the right metrics."""
        named = self.summary.get("task")
        if isinstance(named, str) and named in KINDS:
            return named
        for figures in (self.final, *(line["global"] for line in reversed(self.rounds))):
            if figures:
                return kind_of_metrics(figures)
        return "classification"

    @property
    def summary_sites(self) -> dict[str, dict[str, Any]]:
        sites = self.summary.get("sites")
        if not isinstance(sites, dict):
            return {}
        return {k: v for k, v in sites.items() if isinstance(v, dict)}

    def global_series(self, key: str) -> list[float]:
        return [number(line["global"].get(key)) for line in self.rounds]

    def part(self, line: dict[str, Any], name: str) -> dict[str, Any]:
        value = line.get(name)
        return value if isinstance(value, dict) else {}

    def series(self, part: str, key: str) -> list[float]:
        """``line[part][key]`` per round, e.g. ("bytes", "up")."""
        return [number(self.part(line, part).get(key)) for line in self.rounds]

    def site_entry(self, line: dict[str, Any], site: str) -> dict[str, Any]:
        entry = self.part(line, "sites").get(site)
        return entry if isinstance(entry, dict) else {}

    def site_series(self, site: str, key: str, local: bool = False) -> list[float]:
        """One figure of one site per round (``local``: its own validation metrics of
        that round's model, see ``local_figures``)."""
        if local:
            by_model = self.local_figures(site)
            return [number(by_model.get(r, {}).get(key)) for r in self.round_numbers]
        return [number(self.site_entry(line, site).get(key)) for line in self.rounds]

    def local_figures(self, site: str) -> dict[int, dict[str, Any]]:
        """The site's local evaluation of each round's model, by round.

        A train reply evaluates the model its request carried, so round r's line holds
        the figures of the model of round ``local_model`` (r - 1; 0 is the initial
        model) and the last line the final model's as ``local_final``. Lines without
        ``local_model`` (older runs) hold their own round's model's figures.
        """
        out: dict[int, dict[str, Any]] = {}
        for line in self.rounds:
            entry = self.site_entry(line, site)
            model = line.get("local_model", line["round"])
            figures = entry.get("local")
            if isinstance(figures, dict) and isinstance(model, int):
                out[int(model)] = figures
            final = entry.get("local_final")
            if isinstance(final, dict):
                out[int(line["round"])] = final
        return out

    def status_counts(self) -> dict[str, list[int]]:
        """Sites trained/declined/dropped per round; aggregation counts when sites are absent."""
        counts: dict[str, list[int]] = {s: [] for s in STATUSES}
        for line in self.rounds:
            sites = self.part(line, "sites")
            agg = self.part(line, "aggregation")
            for status in STATUSES:
                if sites:
                    n = sum(1 for e in sites.values()
                            if isinstance(e, dict) and e.get("status") == status)
                else:
                    raw = agg.get("participants" if status == "trained" else status)
                    n = int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else 0
                counts[status].append(n)
        return counts

    @property
    def dp_reported(self) -> bool:
        """Whether any site reported a privacy spend: the evidence DP actually ran."""
        return any(math.isfinite(number(self.site_entry(line, s).get("epsilon")))
                   for line in self.rounds for s in self.site_names)

    @property
    def dp_configured(self) -> bool:
        if any(self.part(line, "aggregation").get("private") is True for line in self.rounds):
            return True
        return self.config.get("privacy.enabled") is True

    @property
    def secure_rounds(self) -> int:
        return sum(1 for line in self.rounds
                   if self.part(line, "aggregation").get("secure") is True)


def load_run(path: Path | str) -> RunData:
    """Read and validate ``RUN``; raises ``DataError`` naming the first defect."""
    run = Path(path)
    if not run.exists():
        raise DataError(f"{run}: no such run directory")
    if not run.is_dir():
        raise DataError(f"{run}: not a directory (expected a run directory)")
    return RunData(path=run, rounds=_read_metrics(run / "metrics.jsonl"),
                   summary=_read_summary(run / "summary.json"),
                   config=_read_config(run / "config.toml"))
