"""Parsing of ``site.toml``: what a hospital declares about its own data.

The declaration is checked separately from the files so that a site operator gets
every problem with the declaration at once, each as one readable line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

MODALITIES = ("records", "images", "genomics")
OPTIONAL_MODALITIES = ("images", "genomics")
TASK_KINDS = ("classification", "regression", "survival")
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KNOWN_TOP = {"name", "task", "modalities", "images", "records", "genomics", "synthetic",
              "description"}


@dataclass(frozen=True)
class SiteSpec:
    """The validated content of one ``site.toml``."""

    name: str
    label: str
    classes: tuple[str, ...]
    modalities: dict[str, bool]
    image_size: tuple[int, int] | None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    synthetic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "classification"
    time: str = ""  # survival: the records column of follow-up times (> 0)
    event: str = ""  # survival: the records column of 1 = event, 0 = censored
    unit: str = ""  # survival: the unit the times are in, as the site states it

    def has(self, modality: str) -> bool:
        return self.modalities.get(modality, False)

    @property
    def outcome_columns(self) -> tuple[str, ...]:
        """The records columns that hold the outcome: never fed to the model."""
        return (self.time, self.event) if self.kind == "survival" else (self.label,)


def _class_text(value: Any) -> str | None:
    """Labels are compared as text so that ``1`` in TOML matches ``1`` in a CSV."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _str_list(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def parse_site_spec(path: Path) -> tuple[SiteSpec | None, list[str]]:
    """Parse ``site.toml``; returns the spec (or None) and the list of problems."""
    where = "site.toml"
    if not path.is_file():
        return None, [f"{where}: missing (every site folder needs one)"]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        return None, [f"{where}: not UTF-8 text"]
    except OSError as exc:
        return None, [f"{where}: cannot be read ({exc.strerror})"]
    except ValueError as exc:  # TOMLDecodeError, or an integer too long for int()
        return None, [f"{where}: not valid TOML ({exc})"]
    problems: list[str] = []
    for key in raw:
        if key not in _KNOWN_TOP:
            problems.append(f"{where}: unknown key '{key}'")

    name = raw.get("name")
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        problems.append(f"{where}: 'name' must be 1-64 letters, digits, '.', '_' or '-' "
                        f"(got {name!r})")

    task = raw.get("task")
    label = "label"
    classes: tuple[str, ...] = ()
    kind = "classification"
    time_col = event_col = unit = ""
    if not isinstance(task, dict):
        problems.append(f"{where}: missing [task] table (label column and classes)")
    else:
        kind_v = task.get("kind", "classification")
        if kind_v not in TASK_KINDS:
            problems.append(f"{where}: task.kind must be one of {', '.join(TASK_KINDS)} "
                            f"(got {kind_v!r})")
        else:
            kind = kind_v
        allowed = {"classification": {"kind", "label", "classes"},
                   "regression": {"kind", "label", "unit"},
                   "survival": {"kind", "time", "event", "unit"}}[kind]
        for key in task:
            if key not in allowed:
                problems.append(f"{where}: task.{key} does not apply to kind = {kind!r} "
                                f"(allowed: {', '.join(sorted(allowed))})")
        if kind == "survival":
            label = ""
            for key in ("time", "event"):
                value = task.get(key)
                if not isinstance(value, str) or not value.strip():
                    problems.append(f"{where}: task.{key} must name a records column "
                                    f"(got {value!r})")
            time_v, event_v = task.get("time"), task.get("event")
            if isinstance(time_v, str) and isinstance(event_v, str):
                time_col, event_col = time_v, event_v
                if time_v == event_v:
                    problems.append(f"{where}: task.time and task.event name the same "
                                    f"column {time_v!r}")
        else:
            label_v = task.get("label", "label")
            if not isinstance(label_v, str) or not label_v.strip():
                problems.append(f"{where}: task.label must be a column name (got {label_v!r})")
            else:
                label = label_v
        if "unit" in task:
            unit_v = task["unit"]
            if not isinstance(unit_v, str) or not unit_v.strip():
                problems.append(f"{where}: task.unit must be text such as \"days\" "
                                f"(got {unit_v!r})")
            else:
                unit = unit_v.strip()
        if kind == "classification":
            cls = task.get("classes")
            texts = [_class_text(c) for c in cls] if isinstance(cls, list) else None
            if texts is None or any(t is None for t in texts):
                problems.append(f"{where}: task.classes must be a list of integers or "
                                f"strings (got {cls!r})")
            elif len(set(texts)) < 2 or len(set(texts)) != len(texts):
                problems.append(f"{where}: task.classes needs at least 2 distinct values "
                                f"(got {cls!r})")
            else:
                classes = tuple(t for t in texts if t is not None)

    mods_raw = raw.get("modalities", {})
    modalities = {"records": True, "images": False, "genomics": False}
    if not isinstance(mods_raw, dict):
        problems.append(f"{where}: [modalities] must be a table of true/false")
    else:
        for key, value in mods_raw.items():
            if key not in MODALITIES:
                problems.append(f"{where}: unknown modality '{key}' (known: "
                                f"{', '.join(MODALITIES)})")
            elif not isinstance(value, bool):
                problems.append(f"{where}: modalities.{key} must be true or false")
            else:
                modalities[key] = value
        if not modalities["records"]:
            problems.append(f"{where}: modalities.records must be true (records.csv is "
                            "required)")

    image_size: tuple[int, int] | None = None
    images = raw.get("images", {})
    if modalities["images"]:
        size = images.get("size") if isinstance(images, dict) else None
        if (isinstance(size, list) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
                and all(4 <= s <= 4096 for s in size)):
            image_size = (size[0], size[1])
        else:
            problems.append(f"{where}: images.size must be [height, width] in pixels, "
                            f"4-4096 each (got {size!r})")

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    records = raw.get("records", {})
    if not isinstance(records, dict):
        problems.append(f"{where}: [records] must be a table")
    else:
        for key in ("categorical", "numeric"):
            if key in records:
                value = _str_list(records[key])
                if value is None:
                    problems.append(f"{where}: records.{key} must be a list of column names")
                elif key == "categorical":
                    categorical = value
                else:
                    numeric = value
        both = set(categorical) & set(numeric)
        if both:
            problems.append(f"{where}: columns declared both numeric and categorical: "
                            f"{', '.join(sorted(both))}")

    synthetic = raw.get("synthetic", False)
    if not isinstance(synthetic, bool):
        problems.append(f"{where}: 'synthetic' must be true or false")
        synthetic = False
    if problems:
        return None, problems
    assert isinstance(name, str)
    outcome = {time_col, event_col} if kind == "survival" else {label}
    clash = outcome & (set(categorical) | set(numeric))
    if clash:
        problems.append(f"{where}: outcome column(s) {', '.join(sorted(clash))} also "
                        "declared as clinical features in [records]")
        return None, problems
    return SiteSpec(name=name, label=label, classes=classes, modalities=modalities,
                    image_size=image_size, categorical=categorical, numeric=numeric,
                    synthetic=synthetic, kind=kind, time=time_col, event=event_col,
                    unit=unit), []


def write_site_spec(path: Path, spec: SiteSpec, description: str = "") -> None:
    """Write a ``site.toml`` (used by the synthetic cohort and the examples)."""
    def is_int(s: str) -> bool:  # "01" or "١" must stay strings: not TOML integers
        try:
            return str(int(s)) == s
        except ValueError:
            return False

    def value(item: Any) -> str:
        """tomli_w's spelling of a value, with arrays kept on one line: a site.toml is
        read and edited by people, and the design contract shows ``classes = [0, 1]``."""
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return tomli_w.dumps({"v": item})[len("v = "):].rstrip("\n")

    lines = [f"name = {value(spec.name)}"]
    if spec.synthetic:
        lines.append("synthetic = true")
    if description:
        lines.append(f"description = {value(description)}")
    classes = [int(c) if is_int(c) else c for c in spec.classes]
    lines += ["", "[task]"]
    if spec.kind != "classification":
        lines.append(f"kind = {value(spec.kind)}")
    if spec.kind == "survival":
        lines += [f"time = {value(spec.time)}", f"event = {value(spec.event)}"]
    else:
        lines.append(f"label = {value(spec.label)}")
    if spec.kind == "classification":
        lines.append(f"classes = {value(classes)}")
    if spec.unit:
        lines.append(f"unit = {value(spec.unit)}")
    lines += ["", "[modalities]"]
    lines += [f"{m} = {value(spec.has(m))}" for m in MODALITIES]
    if spec.image_size is not None and spec.has("images"):
        lines += ["", "[images]", f"size = {value(list(spec.image_size))}"]
    if spec.categorical or spec.numeric:
        lines += ["", "[records]"]
        if spec.categorical:
            lines.append(f"categorical = {value(list(spec.categorical))}")
        if spec.numeric:
            lines.append(f"numeric = {value(list(spec.numeric))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
