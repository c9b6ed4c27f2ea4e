"""``mmfed data import``: one hospital export (EHR extract, PACS export, expression matrix)
in, one site folder out.

Every hospital used to write its own conversion script, and each script was a place where
patient ids got mixed up or PHI leaked into the site folder. This module is the one place
that does it, with rules written down once:

- patients are the records' rows; the records' id column is the only key;
- the task kind decides the outcome columns: a class or a number in ``label``
  (classification, regression), or a follow-up ``time`` (> 0) and an ``event`` (1 = event,
  0 = censored; 1/0, true/false and yes/no are accepted in any case) for survival;
- a DICOM file belongs to the patient in its header's PatientID, any other image to the
  patient its file stem names; images of patients absent from the records are counted and
  left behind;
- only pixels leave a DICOM file: they are written as ``images/<patient_id>.npy``;
  ``import.json`` names source files by the SHA-256 of their bytes (which carries no name
  and lets an operator find the file with ``sha256sum``), never by path, because PACS
  exports name folders after patients;
- nothing is written to ``SITE`` until everything has been read and the result passes the
  same reader ``mmfed data check`` uses; the folder then appears in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.data.pixels import (
    CATEGORY_UNDECODABLE,
    CATEGORY_UNKNOWN,
    Candidate,
    SkipFile,
    choose,
    decode,
    probe,
)
from mmfed.data.reader import one_line, read_site
from mmfed.data.sitespec import SITE_NAME_RE, TASK_KINDS, SiteSpec, write_site_spec
from mmfed.data.tables import EVENT_WORDS, read_genomics, read_records
from mmfed.errors import DataError, UsageError

IMPORT_FORMAT = 1
ABSENT = "patient not in the records"
# Column names an EHR extract uses for direct identifiers: imported only if asked, since a
# name or a birth date as a "clinical feature" is PHI in the site folder and a leak into the
# model.
_IDENTIFYING = ("name", "birth", "dob", "address", "phone", "email", "ssn", "social",
                "mrn", "accession", "street", "zip", "postcode")
# Below this many files the import finishes before a progress bar is worth drawing.
_PROGRESS_FILES = 200


@dataclass
class ImportSettings:
    """What ``mmfed data import`` was asked to do (the design contract's flags).

    ``label`` names the outcome of classification and regression; survival names two
    columns instead (``time_column``, ``event_column``) and leaves ``label`` empty.
    """

    out: Path
    name: str
    records: Path
    id_column: str
    label: str = ""
    classes: list[str] | None = None
    task: str = "classification"
    time_column: str = ""
    event_column: str = ""
    unit: str = ""
    images: Path | None = None
    image_size: tuple[int, int] = (64, 64)
    genomics: Path | None = None
    force: bool = False
    drop: list[str] = field(default_factory=list)
    workers: int = 1


@dataclass
class ImportResult:
    """What was imported: the figures of the summary line and of ``import.json``."""

    patients: int
    images: int
    genomics: int
    files: int
    skipped: Counter[str]
    absent_patients: int
    absent_files: int
    unchosen: int
    dropped_no_label: int
    seconds: float
    image_seconds: float
    warnings: list[str]
    skipped_files: list[tuple[str, str]]  # (file name, reason) for the console

    def summary(self, out: Path) -> str:
        no_image = self.patients - self.images
        parts = [f"imported {self.patients} patients into {out}"]
        if self.files:
            parts.append(f"{self.images} with an image, {no_image} without")
        if self.genomics:
            parts.append(f"{self.genomics} with genomics")
        line = parts[0] + (f" ({'; '.join(parts[1:])})" if parts[1:] else "")
        if self.files:
            rate = self.images / self.image_seconds if self.image_seconds > 0 else 0.0
            line += (f"; {self.files} files read, {sum(self.skipped.values())} skipped"
                     + (": " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
                        if self.skipped else "")
                     + f"; {rate:.0f} images/s")
        return line


def _check_task(s: ImportSettings) -> None:
    """Refuse, as usage errors, flags the chosen task needs but lacks and flags it would
    ignore: an ignored ``--classes`` or ``--label`` means the operator meant another task,
    and importing anyway would write a site folder that trains the wrong model."""
    task = f"--task {s.task}"
    if s.task not in TASK_KINDS:
        raise UsageError(f"{task}: choose one of {', '.join(TASK_KINDS)}")
    if s.task == "survival":
        missing = [f for f, v in (("--time-column", s.time_column),
                                  ("--event-column", s.event_column)) if not v]
        if missing:
            raise UsageError(f"{task} needs {' and '.join(missing)} (survival reads the "
                             "follow-up time from --time-column and the event from "
                             "--event-column)")
        given = [f for f, v in (("--label", s.label), ("--classes", s.classes))
                 if v is not None and v != ""]
        if given:
            raise UsageError(f"{task} does not take {' or '.join(given)}: the outcome is "
                             "--time-column and --event-column")
        if s.time_column == s.event_column:
            raise UsageError(f"--time-column and --event-column name the same column "
                             f"{s.time_column!r}")
        outcome = [("--time-column", s.time_column), ("--event-column", s.event_column)]
    else:
        if not s.label:
            raise UsageError(f"{task} needs --label (the outcome column)")
        extra = [f for f, v in (("--time-column", s.time_column),
                                ("--event-column", s.event_column)) if v]
        if extra:
            raise UsageError(f"{task} does not take {' or '.join(extra)} (survival only: "
                             "add --task survival)")
        if s.task == "regression" and s.classes is not None:
            raise UsageError(f"{task} does not take --classes: a regression label is a "
                             "number")
        if s.task == "classification" and s.unit:
            raise UsageError(f"{task} does not take --unit (regression and survival only)")
        outcome = [("--label", s.label)]
    for flag, col in outcome:
        if col == s.id_column:
            raise UsageError(f"--id-column and {flag} name the same column {col!r}")
    if not s.unit.isprintable():
        raise UsageError(f"--unit {s.unit!r}: give one line of text, such as days")


def _check_settings(s: ImportSettings) -> None:
    if not SITE_NAME_RE.match(s.name):
        raise UsageError(f"--name {s.name!r}: use letters, digits, '.', '_' or '-' (at most "
                         "64, starting with a letter or digit)")
    _check_task(s)
    h, w = s.image_size
    if not (4 <= h <= 4096 and 4 <= w <= 4096):
        raise UsageError(f"--image-size {h} {w}: each side must be between 4 and 4096")
    if s.workers < 1:
        raise UsageError("--workers must be at least 1")
    if not s.records.is_file():
        raise DataError(f"--records {s.records}: no such file")
    if s.images is not None and not s.images.is_dir():
        raise DataError(f"--images {s.images}: no such folder")
    if s.genomics is not None and not s.genomics.is_file():
        raise DataError(f"--genomics {s.genomics}: no such file")
    out = s.out.resolve()
    for flag, src in (("--records", s.records), ("--images", s.images),
                      ("--genomics", s.genomics)):
        if src is None:
            continue
        src_r = src.resolve()
        if out == src_r or out in src_r.parents or src_r in out.parents:
            raise UsageError(f"--out {s.out} overlaps {flag} {src}: write the site folder "
                             "outside the export (and the export outside it)")
    if s.out.exists() or s.out.is_symlink():
        if not s.force:
            raise DataError(f"{s.out}: already exists (add --force to replace it)")
        if not s.out.is_dir() or s.out.is_symlink():
            raise DataError(f"{s.out}: exists and is not a folder; --force replaces only a "
                            "site folder")
        if any(s.out.iterdir()) and not (s.out / "site.toml").is_file():
            raise DataError(f"{s.out}: not empty and not a site folder (no site.toml); "
                            "--force replaces only a site folder")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: its name in ``import.json``.

    A hash of the path would carry the folder names, and PACS exports name folders after
    patients; the content hash carries nothing a dictionary of names could reverse, and
    ``sha256sum`` finds the file again.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(root: Path) -> list[Path]:
    """Every regular file below ``root`` in a stable order; links are not followed, so an
    export cannot pull files from elsewhere on the machine into a site folder."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or not path.is_file():
                continue
            found.append(path)
    return found


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on a terminal for large exports; nothing otherwise (logs and
    tests read one summary line)."""
    if total < _PROGRESS_FILES or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


_Decoded = tuple[np.ndarray | None, list[str], list[str], str, str, str]


def _decode_one(args: tuple[Candidate, tuple[int, int]]) -> _Decoded:
    """Worker-side decode; a failure travels back as (category, reason) text, so a pool
    never dies on a bad file."""
    cand, size = args
    try:
        out = decode(cand, size)
    except SkipFile as exc:
        return None, [], [], "", exc.category, str(exc)
    except Exception as exc:  # a decoder bug must cost one file, not the import
        return None, [], [], "", CATEGORY_UNDECODABLE, one_line(
            f"{CATEGORY_UNDECODABLE} ({type(exc).__name__})")
    return out.pixels, out.transforms, out.warnings, out.encoding, "", ""


@dataclass
class _Images:
    pixels: dict[str, np.ndarray]
    entries: dict[str, dict[str, Any]]
    skipped: list[dict[str, str]]
    skipped_console: list[tuple[str, str]]
    counts: Counter[str]
    files: int
    absent_patients: int
    absent_files: int
    unchosen: int
    seconds: float
    warnings: list[str]
    encodings: Counter[str]


def _import_images(root: Path, ids: set[str], size: tuple[int, int],
                   workers: int) -> _Images:
    start = time.perf_counter()
    files = _walk(root)
    counts: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    console: list[tuple[str, str]] = []
    digests: dict[Path, str] = {}

    def skip(path: Path, category: str, reason: str) -> None:
        counts[category] += 1
        # An unreadable file has no digest: it is listed by an empty one, still counted.
        skipped.append({"sha256": digests.get(path, ""), "reason": reason})
        console.append((path.name, reason))

    by_patient: dict[str, list[Candidate]] = {}
    absent: dict[str, int] = {}
    with _progress(len(files), "reading headers") as tick:
        for path in files:
            try:
                digests[path] = file_digest(path)
                cand = probe(path)
            except SkipFile as exc:
                skip(path, exc.category, str(exc))
            except OSError as exc:
                skip(path, CATEGORY_UNKNOWN, one_line(f"cannot be read ({exc.strerror})"))
            else:
                if cand.patient_id in ids:
                    by_patient.setdefault(cand.patient_id, []).append(cand)
                else:
                    absent[cand.patient_id] = absent.get(cand.patient_id, 0) + 1
                    counts[ABSENT] += 1
                    # The id itself is not written: a patient absent from the records is
                    # not this import's business, and an id is identifying.
                    skipped.append({"sha256": digests[path], "reason": ABSENT})
            tick()

    pixels: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    encodings: Counter[str] = Counter()
    unchosen = 0
    pending = {pid: list(cands) for pid, cands in sorted(by_patient.items())}
    total = {pid: len(cands) for pid, cands in pending.items()}
    pool = None
    if workers > 1 and len(pending) > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers)
    try:
        with _progress(len(pending), "decoding images") as tick:
            # Each pass decodes every waiting patient's current choice; a patient whose
            # choice fails falls back to the next one the rule picks, so every decodable
            # patient ends with exactly one image.
            while pending:
                chosen = {pid: choose(cands, root) for pid, cands in pending.items()}
                jobs = [(c, size) for c, _ in chosen.values()]
                results = (list(pool.map(_decode_one, jobs, chunksize=4)) if pool
                           else [_decode_one(job) for job in jobs])
                still: dict[str, list[Candidate]] = {}
                for (pid, (cand, rule)), (arr, transforms, warns, encoding, category, err) in zip(
                        chosen.items(), results, strict=True):
                    rest = [c for c in pending[pid] if c is not cand]
                    if arr is None:
                        reason = err or CATEGORY_UNDECODABLE
                        counts[category or CATEGORY_UNDECODABLE] += 1
                        skipped.append({"sha256": digests[cand.path], "reason": reason})
                        console.append((cand.path.name, reason))
                        if rest:
                            still[pid] = rest
                        else:
                            tick()
                        continue
                    pixels[pid] = arr
                    unchosen += len(rest)
                    encodings[encoding] += 1
                    entries[pid] = {"sha256": digests[cand.path], "kind": cand.kind,
                                    "encoding": encoding,
                                    "candidates": total[pid],
                                    "rule": rule, "transforms": transforms}
                    if warns:
                        entries[pid]["warnings"] = warns
                        warnings.extend(f"{pid}: {w}" for w in warns)
                    tick()
                pending = still
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return _Images(pixels=pixels, entries=entries, skipped=skipped, skipped_console=console,
                   counts=counts, files=len(files), absent_patients=len(absent),
                   absent_files=sum(absent.values()), unchosen=unchosen,
                   seconds=time.perf_counter() - start, warnings=warnings,
                   encodings=encodings)


def _identifying_columns(columns: list[str]) -> list[str]:
    return [c for c in columns
            if any(key in c.lower().replace("_", "").replace(" ", "") for key in _IDENTIFYING)]


def import_site(s: ImportSettings) -> ImportResult:
    """Read the export, build the site folder beside ``s.out``, check it, then rename it
    into place. Raises ``DataError`` (with every problem) or ``UsageError``; on any failure
    nothing is left at ``s.out`` that was not there before."""
    _check_settings(s)
    start = time.perf_counter()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        rec = read_records(s.records, s.id_column, s.label, s.classes, kind=s.task,
                           time=s.time_column, event=s.event_column)
    except DataError as exc:
        raise DataError(exc.problems[0], exc.problems) from None
    frame = rec.frame
    warnings += rec.warnings
    survival = s.task == "survival"
    targets = ("patient_id", "time", "event") if survival else ("patient_id", "label")
    sources = ((s.id_column, s.time_column, s.event_column) if survival
               else (s.id_column, s.label))
    unknown_drop = [c for c in s.drop if c not in frame.columns and c not in sources]
    if unknown_drop:
        problems.append(f"--drop: no such records column: {', '.join(unknown_drop)}")
    if any(c in sources for c in s.drop):
        problems.append("--drop: the id and outcome columns cannot be dropped")
    frame = frame.drop(columns=[c for c in s.drop if c in frame.columns
                                and c not in targets])
    clinical = [str(c) for c in frame.columns if c not in targets]
    flagged = _identifying_columns(clinical)
    if flagged:
        problems.append(f"records: column(s) {', '.join(flagged)} look like direct "
                        "identifiers; remove them with --drop (or rename them if they are "
                        "not)")
    ids = [str(i) for i in frame["patient_id"].tolist()]
    id_set = set(ids)

    genomics_frame = None
    genomics_info: dict[str, Any] = {}
    if s.genomics is not None:
        try:
            gen = read_genomics(s.genomics, ids)
        except DataError as exc:
            problems.extend(exc.problems)
        else:
            genomics_frame = gen.frame
            warnings += gen.warnings
            genomics_info = {"sha256": file_digest(s.genomics), "orientation": gen.orientation,
                             "genes": len(gen.frame.columns) - 1, "samples": gen.matched,
                             "samples_not_in_records": gen.unmatched_samples}

    images: _Images | None = None
    if s.images is not None:
        images = _import_images(s.images, id_set, s.image_size, s.workers)
        warnings += images.warnings
        if not images.pixels:
            problems.append(f"--images {s.images}: no image belongs to a patient in the records "
                            f"({images.files} files, {images.absent_patients} patient ids "
                            "not in the records): check --id-column against the DICOM "
                            "PatientID or the file names")
    if problems:
        raise DataError(one_line(problems[0]), [one_line(p) for p in problems])

    spec = SiteSpec(name=s.name, label="" if survival else "label",
                    classes=tuple(rec.classes),
                    modalities={"records": True, "images": images is not None,
                                "genomics": genomics_frame is not None},
                    image_size=s.image_size if images is not None else None,
                    kind=s.task, time="time" if survival else "",
                    event="event" if survival else "", unit=s.unit)
    report: dict[str, Any] = {
        "format": IMPORT_FORMAT,
        "tool": "mmfed data import",
        "settings": {"name": s.name, **_task_settings(s, rec.classes),
                     "image_size": list(s.image_size), "dropped_columns": sorted(s.drop)},
        "records": {"sha256": file_digest(s.records), "patients": len(ids),
                    "dropped_no_label": rec.dropped_no_label},
    }
    if survival:
        report["records"]["events"] = int((frame["event"] == "1").sum())
    if genomics_info:
        report["genomics"] = genomics_info
    patients: dict[str, dict[str, Any]] = {}
    gen_ids = set(genomics_frame["patient_id"]) if genomics_frame is not None else set()
    for pid in ids:
        entry: dict[str, Any] = {}
        if images is not None:
            entry["image"] = images.entries.get(pid)
        if genomics_frame is not None:
            entry["genomics"] = pid in gen_ids
        patients[pid] = entry
    report["patients"] = patients
    if images is not None:
        report["images"] = {
            "files": images.files, "imported": len(images.pixels),
            "patients_without_image": len(ids) - len(images.pixels),
            "absent_from_records": {"patients": images.absent_patients,
                                    "files": images.absent_files},
            "not_chosen": images.unchosen,
            "imported_by_encoding": dict(sorted(images.encodings.items())),
            "skipped_by_reason": dict(sorted(images.counts.items())),
            "rules": RULES}
        report["skipped"] = sorted(images.skipped, key=lambda e: (e["reason"], e["sha256"]))
    report["warnings"] = [one_line(w) for w in warnings]

    _write_atomically(s, spec, frame, images, genomics_frame, report)
    return ImportResult(
        patients=len(ids), images=len(images.pixels) if images else 0,
        genomics=len(gen_ids), files=images.files if images else 0,
        skipped=images.counts if images else Counter(),
        absent_patients=images.absent_patients if images else 0,
        absent_files=images.absent_files if images else 0,
        unchosen=images.unchosen if images else 0, dropped_no_label=rec.dropped_no_label,
        seconds=time.perf_counter() - start, image_seconds=images.seconds if images else 0.0,
        warnings=warnings, skipped_files=images.skipped_console if images else [])


def _task_settings(s: ImportSettings, classes: list[str]) -> dict[str, Any]:
    """The task part of ``import.json``'s settings: what the outcome columns were and how
    they were recoded, so a site folder can be traced back to the export's columns.

    A classification import records exactly what it recorded before task kinds existed
    (plus ``task``), so earlier import reports and new ones compare key for key.
    """
    out: dict[str, Any] = {"task": s.task}
    if s.task == "survival":
        out |= {"time_column": s.time_column, "event_column": s.event_column,
                "event_values": {"1 (event)": sorted(k for k, v in EVENT_WORDS.items()
                                                     if v == "1"),
                                 "0 (censored)": sorted(k for k, v in EVENT_WORDS.items()
                                                        if v == "0")}}
    else:
        out["label"] = s.label
        if s.task == "classification":
            out["classes"] = classes
    if s.unit:
        out["unit"] = s.unit
    return out


RULES = [
    "a DICOM file belongs to the patient in its PatientID; any other image to its file stem",
    "several images of one patient: DICOM before other files; the series with the most "
    "images, frames counted (ties: lowest SeriesNumber, then path); its middle instance "
    "by InstanceNumber (ties: path); other files: the first by path",
    "multi-frame objects: the middle frame",
    "modality LUT (rescale slope/intercept or LUT sequence) applied; MONOCHROME1 inverted",
    "colour (RGB, YBR, palette) to luminance (ITU-R BT.601), with a warning",
    "aspect ratio kept: padded with the image minimum, then resampled to the image size",
]


def _write_atomically(s: ImportSettings, spec: SiteSpec, frame: Any,
                      images: _Images | None, genomics_frame: Any,
                      report: dict[str, Any]) -> None:
    parent = s.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, s.out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{s.out.name}.import-{os.getpid()}-", dir=parent))
    old: Path | None = None
    try:
        write_site_spec(tmp / "site.toml", spec)
        frame.to_csv(tmp / "records.csv", index=False, lineterminator="\n")
        if images is not None:
            (tmp / "images").mkdir()
            for pid, arr in images.pixels.items():
                np.save(tmp / "images" / f"{pid}.npy", arr.astype(np.float32))
        if genomics_frame is not None:
            genomics_frame.to_csv(tmp / "genomics.csv", index=False, lineterminator="\n")
        (tmp / "import.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n",
                                         encoding="utf-8")
        check = read_site(tmp)
        if not check.ok:
            raise DataError(f"the imported folder does not pass `mmfed data check`: "
                            f"{check.problems[0]}", check.problems)
        if s.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{s.out.name}.old-", dir=parent))
            os.replace(s.out, old / "site")
        os.replace(tmp, s.out)
    except BaseException:
        if old is not None and not s.out.exists():
            os.replace(old / "site", s.out)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(parent: Path, name: str) -> None:
    """Remove what a killed import of the same site left beside it (a hidden work folder
    holding pixels); a folder whose process still runs is another import's, kept."""
    for entry in parent.glob(f".{name}.import-*"):
        try:
            pid = int(entry.name[len(f".{name}.import-"):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue


def _unit(text: str | None) -> str:
    """``--unit`` as written to site.toml: stripped; given but blank is a usage error
    rather than silently no unit, since the operator meant to state one."""
    if text is None:
        return ""
    if not text.strip():
        raise UsageError("--unit: give the unit as text, such as days or months")
    return text.strip()


def import_from_args(args: Any) -> int:
    """The ``mmfed data import`` command."""
    task = getattr(args, "task", None) or "classification"
    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        # Another task refuses --classes outright (in _check_task), whatever its spelling.
        if task == "classification" and (any(not c for c in classes)
                                         or len(set(classes)) != len(classes)):
            raise UsageError(f"--classes {args.classes!r}: give distinct, non-empty values "
                             "separated by commas")
    drop = [c.strip() for c in (args.drop or "").split(",") if c.strip()]
    settings = ImportSettings(out=args.out, name=args.name, records=args.records,
                              id_column=args.id_column, label=args.label or "",
                              classes=classes, task=task,
                              time_column=getattr(args, "time_column", None) or "",
                              event_column=getattr(args, "event_column", None) or "",
                              unit=_unit(getattr(args, "unit", None)),
                              images=args.images, image_size=tuple(args.image_size),
                              genomics=args.genomics, force=args.force, drop=drop,
                              workers=args.workers or max(1, min(4, os.cpu_count() or 1)))
    try:
        result = import_site(settings)
    except DataError as exc:
        for problem in exc.problems:
            print(f"problem: {problem}")
        print(f"mmfed data import: {len(exc.problems)} problem(s); nothing was written to "
              f"{args.out}", file=sys.stderr)
        return 1
    if not args.quiet:
        for name, reason in result.skipped_files:
            print(f"skipped: {one_line(name)}: {reason}", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {one_line(warning)}", file=sys.stderr)
    if result.absent_files:
        print(f"{result.absent_files} image file(s) of {result.absent_patients} patient(s) not "
              "in the records were not imported")
    if result.unchosen:
        print(f"{result.unchosen} further image file(s) of patients with several were not "
              "used (one image per patient; import.json gives the rule)")
    print(result.summary(args.out))
    return 0
