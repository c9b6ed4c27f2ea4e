"""Reading one hospital's site folder into arrays, collecting every problem on the way.

The reader and ``mmfed data check`` are the same code: a site that checks clean is
exactly a site that trains, and an operator sees all problems in one pass instead of
fixing them one traceback at a time.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmfed.data.sitespec import SiteSpec, parse_site_spec
from mmfed.errors import DataError

IMAGE_EXTS = (".png", ".npy", ".dcm")
# Real exports mark gaps in several ways; all of them mean "not measured".
MISSING_MARKERS = frozenset({"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "."})
_MAX_EXAMPLES = 3
# Values are stored as float32: anything larger would silently become infinity.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SiteData:
    """One site's patients, aligned by row: row i of every array is patient ``ids[i]``."""

    spec: SiteSpec
    ids: list[str]
    labels: np.ndarray  # int64: class index into spec.classes; survival: the event (0/1)
    numeric_cols: list[str]
    numeric: np.ndarray  # float32 (n, k), NaN where missing
    categorical_cols: list[str]
    categorical: list[list[str | None]]  # per column, per patient
    images: np.ndarray | None  # float32 (n, 1, H, W), zeros where absent
    image_mask: np.ndarray  # bool (n,)
    genes: list[str]
    genomics: np.ndarray | None  # float32 (n, G), NaN where missing
    genomics_mask: np.ndarray  # bool (n,)
    # float64 (n,): the regression label, or the survival time; None when classifying
    targets: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ReadResult:
    """Outcome of reading a site folder: data only when there are no problems."""

    site: SiteData | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``).

    Column names, labels and file names come from the site's own files and may hold
    anything; every problem must still print as exactly one line.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_EXAMPLES])
    more = len(items) - _MAX_EXAMPLES
    return shown + (f" and {more} more" if more > 0 else "")


def bad_id(pid: str) -> str | None:
    if pid in MISSING_MARKERS or not pid.strip():
        return "empty"
    if "/" in pid or "\\" in pid or ".." in pid:
        return "contains '/', '\\' or '..'"
    if any(ord(ch) < 32 for ch in pid):
        return "contains control characters"
    if pid != pid.strip():
        return "has leading or trailing spaces"
    return None


def _plain_csv(text: str) -> pd.DataFrame | None:
    """The frame pandas would read from a plain CSV (no quotes, no blank lines, every
    row as wide as the header), built as one block of text cells; None for anything
    else, which pandas then reads (and, if malformed, explains).

    Why: pandas builds one column object per column, which for a 2,000-gene file is
    most of the cost of reading a site, and a simulation worker answering for hundreds
    of sites reads them again and again. ``tests/test_scale.py`` checks both paths
    give the same frame.
    """
    if '"' in text:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if len(lines) < 2 or any("\r" in line or not line.strip() for line in lines):
        return None
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    if any(len(row) != len(header) for row in rows):
        return None
    return pd.DataFrame(np.array(rows, dtype=object), columns=header, dtype=object)


def _read_csv(path: Path, problems: list[str]) -> pd.DataFrame | None:
    """Read a CSV as text only, so ids keep leading zeros and nothing is guessed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path.name}: cannot be read ({exc.strerror})")
        return None
    if b"\x00" in raw:
        problems.append(f"{path.name}: binary content, not a CSV file")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(f"{path.name}: not UTF-8 text (byte {exc.start})")
        return None
    if not text.strip():
        problems.append(f"{path.name}: empty file")
        return None
    try:
        frame = _plain_csv(text)
        if frame is None:
            frame = pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=False,
                                na_filter=False, skipinitialspace=False)
    except (pd.errors.ParserError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"{path.name}: malformed CSV ({first})")
        return None
    try:
        header = [h.strip() for h in next(csv.reader(io.StringIO(text)))]
    except csv.Error as exc:  # e.g. a header field beyond the csv module's size limit
        problems.append(f"{path.name}: malformed CSV header ({exc})")
        return None
    if any(not h for h in header):
        problems.append(f"{path.name}: header has empty column names")
        return None
    dupes = sorted(h for h, times in Counter(header).items() if times > 1)  # O(columns)
    if dupes:
        problems.append(f"{path.name}: duplicate column names in header: {', '.join(dupes)}")
        return None
    cols = [str(c) for c in frame.columns]
    frame.columns = [c.strip() for c in cols]
    return frame


def to_float(values: pd.Series) -> tuple[np.ndarray, list[int]]:
    """Parse text cells as floats; returns values (NaN for missing) and bad row indices."""
    text = values.astype(str).str.strip()
    missing = text.isin(MISSING_MARKERS).to_numpy()
    parsed = pd.to_numeric(text.where(~missing, "nan"), errors="coerce").to_numpy(
        dtype=np.float64, copy=True)
    bad_mask = ~missing & ~(np.abs(parsed) <= _FLOAT32_MAX)  # NaN, inf, beyond float32
    parsed[bad_mask] = np.nan
    return parsed, np.flatnonzero(bad_mask).tolist()


def _to_float_block(frame: pd.DataFrame) -> np.ndarray | None:
    """Every cell of an all-numeric block at once (NaN for missing markers).

    Thousands of gene columns parsed one by one cost seconds per site, which a
    100-site simulation pays on every site load. Returns None whenever any cell is
    not a plain finite number or a missing marker, so that the per-column path
    (``to_float``) can name the bad cells; the ASCII/underscore guard keeps numpy
    from accepting text pandas would reject ("1_000", non-ASCII digits).
    """
    text = np.char.strip(frame.to_numpy(dtype=str))
    joined = "".join(text.ravel().tolist())
    if "_" in joined or not joined.isascii():
        return None
    missing = np.isin(text, list(MISSING_MARKERS))
    try:
        parsed = np.where(missing, "nan", text).astype(np.float64)
    except ValueError:
        return None
    if not (np.abs(parsed[~missing]) <= _FLOAT32_MAX).all():
        return None
    return parsed


def _check_ids(frame: pd.DataFrame, fname: str, problems: list[str]) -> list[str]:
    """Validate the patient_id column; returns ids (possibly with bad ones)."""
    if "patient_id" not in frame.columns:
        problems.append(f"{fname}: no 'patient_id' column")
        return []
    ids = [str(v) for v in frame["patient_id"].tolist()]
    bad: dict[str, list[str]] = {}
    for line, pid in enumerate(ids, start=2):
        why = bad_id(pid)
        if why is not None:
            bad.setdefault(why, []).append(f"line {line}")
    for why, where in bad.items():
        kind = "missing patient_id" if why == "empty" else f"patient_id {why}"
        problems.append(f"{fname}: {kind} at {_examples(where)}")
    seen: dict[str, int] = {}
    for pid in ids:
        seen[pid] = seen.get(pid, 0) + 1
    dup = [p for p, c in seen.items() if c > 1 and bad_id(p) is None]
    if dup:
        problems.append(f"{fname}: duplicate patient_id {_examples([repr(d) for d in dup])}")
    return ids


def _read_records(folder: Path, spec: SiteSpec, problems: list[str],
                  warnings: list[str]
                  ) -> tuple[list[str], np.ndarray, np.ndarray | None, list[str], np.ndarray,
                             list[str], list[list[str | None]]] | None:
    path = folder / "records.csv"
    if not path.is_file():
        problems.append("records.csv: missing (required)")
        return None
    frame = _read_csv(path, problems)
    if frame is None:
        return None
    ids = _check_ids(frame, "records.csv", problems)
    keys = {spec.time: "task.time", spec.event: "task.event"} if spec.kind == "survival" \
        else {spec.label: "task.label"}
    absent = [f"no {'label' if key == 'task.label' else key.split('.')[1]} column '{col}' "
              f"({key} in site.toml)" for col, key in keys.items() if col not in frame.columns]
    if absent:
        problems.extend(f"records.csv: {text}" for text in absent)
        return None
    if len(frame) == 0:
        problems.append("records.csv: no patients")
        return None
    targets: np.ndarray | None = None
    if spec.kind == "classification":
        labels = _class_labels(frame[spec.label].tolist(), spec, problems)
    elif spec.kind == "regression":
        labels = np.zeros(len(frame), dtype=np.int64)
        targets = _numbers(frame[spec.label], spec.label, "regression label", problems,
                           lambda v: bool(np.isfinite(v)), "a finite number")
    else:
        targets = _numbers(frame[spec.time], spec.time, "survival time", problems,
                           lambda v: bool(np.isfinite(v) and v > 0), "a time > 0")
        events = _numbers(frame[spec.event], spec.event, "event indicator", problems,
                          lambda v: v in (0.0, 1.0), "1 (event) or 0 (censored)")
        labels = np.nan_to_num(events, nan=0.0).astype(np.int64)  # a bad cell is a problem
    for col in spec.categorical + spec.numeric:
        if col not in frame.columns:
            problems.append(f"records.csv: column '{col}' declared in site.toml is missing")

    clinical = [c for c in frame.columns if c not in ("patient_id", *spec.outcome_columns)]
    numeric_cols: list[str] = []
    numeric_vals: list[np.ndarray] = []
    cat_cols: list[str] = []
    cat_vals: list[list[str | None]] = []
    for col in clinical:
        cells = frame[col].astype(str)
        values, bad = to_float(cells)
        present = int((~cells.str.strip().isin(MISSING_MARKERS)).sum())
        forced_num = col in spec.numeric
        forced_cat = col in spec.categorical
        looks_numeric = present > 0 and len(bad) <= 0.2 * present
        if forced_num or (looks_numeric and not forced_cat):
            if bad:
                where = [f"line {i + 2} {cells.iloc[i]!r}" for i in bad]
                problems.append(f"records.csv: non-numeric value in numeric column '{col}' at "
                                f"{_examples(where)}")
            numeric_cols.append(col)
            numeric_vals.append(values)
            missing = int(np.isnan(values).sum()) - len(bad)
        else:
            stripped = [c.strip() for c in cells.tolist()]
            cat_cols.append(col)
            cat_vals.append([None if c in MISSING_MARKERS else c for c in stripped])
            missing = sum(c in MISSING_MARKERS for c in stripped)
        if missing:
            warnings.append(f"records.csv: column '{col}' has {missing} missing value(s) "
                            f"of {len(frame)} (imputed, with a missing-value indicator)")
    numeric = (np.stack(numeric_vals, axis=1).astype(np.float32) if numeric_vals
               else np.zeros((len(frame), 0), dtype=np.float32))
    return ids, labels, targets, numeric_cols, numeric, cat_cols, cat_vals


def _class_labels(cells: list[object], spec: SiteSpec, problems: list[str]) -> np.ndarray:
    labels = np.full(len(cells), -1, dtype=np.int64)
    index = {c: i for i, c in enumerate(spec.classes)}
    bad_labels: list[str] = []
    for line, cell in enumerate(cells, start=2):
        text = str(cell).strip()
        if text not in index:
            try:  # "1.0" in a CSV is the class 1
                as_float = float(text)
                text = str(int(as_float)) if as_float.is_integer() else text
            except ValueError:
                pass
        if text in index:
            labels[line - 2] = index[text]
        else:
            bad_labels.append(f"line {line} {text!r}")
    if bad_labels:
        problems.append(f"records.csv: label outside the declared classes "
                        f"{list(spec.classes)} at {_examples(bad_labels)}")
    return labels


def _numbers(cells: pd.Series, column: str, what: str, problems: list[str],
             valid: Callable[[float], bool], expected: str) -> np.ndarray:
    """An outcome column as float64, every cell checked: an outcome is never imputed,
    so a missing or malformed one is a problem to fix, not a gap to fill."""
    values = np.full(len(cells), np.nan, dtype=np.float64)
    bad: list[str] = []
    for i, cell in enumerate(cells.astype(str).tolist()):
        text = cell.strip()
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if text in MISSING_MARKERS or not valid(value):
            bad.append(f"line {i + 2} {text!r}")
        else:
            values[i] = value
    if bad:
        problems.append(f"records.csv: {what} in '{column}' must be {expected} at "
                        f"{_examples(bad)} ({len(bad)} row(s))")
    return values


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def _one_channel(arr: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    """A colour array whose channels are all equal is a grayscale image an export tool
    saved as RGB: take one channel (with a note); real colour stays an error, since which
    luminance the model should see is the import's decision, not the reader's."""
    from mmfed.data.pixels import equal_channels

    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        gray = equal_channels(arr)
        if gray is None:
            raise ValueError(f"colour {what} (channels differ); convert it with "
                             "`mmfed data import`")
        notes.append("equal colour channels")
        return gray
    return arr


def _load_image(path: Path, notes: list[str] | None = None) -> np.ndarray:
    """Load one grayscale image as float32 (H, W); raises ValueError with the reason.

    ``notes`` collects conversions the caller should warn about."""
    arr: np.ndarray  # np.load is typed Any
    notes = [] if notes is None else notes
    ext = path.suffix.lower()
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises many types for corrupt files
            raise ValueError("not a readable .npy array") from exc
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        if arr.ndim != 2 or not real:  # complex and bool are not pixel intensities
            raise ValueError(f"expected a 2-D numeric array, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
    elif ext == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("RGB", "RGBA"):
                    arr = _one_channel(np.asarray(img), f"PNG (mode {img.mode})", notes)
                elif img.mode not in ("L", "I", "I;16", "I;16B", "F", "1"):
                    raise ValueError(f"not grayscale (mode {img.mode})")
                else:
                    arr = np.asarray(img)
        except Image.DecompressionBombError as exc:
            raise ValueError("too many pixels (decompression-bomb limit)") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError("not a readable PNG") from exc
    else:
        import pydicom

        try:
            ds = pydicom.dcmread(path)
            arr = np.asarray(ds.pixel_array)
        except Exception as exc:  # pydicom raises many types (struct.error, ...) when corrupt
            raise ValueError("not a readable DICOM image") from exc
        if arr.ndim == 3 and str(ds.get("SamplesPerPixel", 1)) == "3":
            arr = _one_channel(arr, f"DICOM ({ds.get('PhotometricInterpretation', '?')})",
                               notes)
        if arr.ndim != 2:
            raise ValueError(f"expected one grayscale frame, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("contains NaN or infinite pixels")
    return arr


def _read_images(folder: Path, spec: SiteSpec, ids: list[str], problems: list[str],
                 warnings: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    n = len(ids)
    mask = np.zeros(n, dtype=bool)
    img_dir = folder / "images"
    if not spec.has("images"):
        if img_dir.exists():
            warnings.append("images/: present but modalities.images = false in site.toml "
                            "(ignored)")
        return None, mask
    assert spec.image_size is not None
    if not img_dir.is_dir():
        problems.append("images/: missing, but modalities.images = true in site.toml")
        return None, mask
    if not _inside(folder, img_dir):
        problems.append("images/: points outside the site folder")
        return None, mask
    h, w = spec.image_size
    images = np.zeros((n, 1, h, w), dtype=np.float32)
    row = {pid: i for i, pid in enumerate(ids)}
    seen: dict[str, str] = {}
    unknown: list[str] = []
    unreadable: list[str] = []
    wrong_size: list[str] = []
    escaping: list[str] = []
    others: list[str] = []
    dupes: list[str] = []
    converted: list[str] = []
    for path in sorted(img_dir.iterdir()):
        if path.name.startswith("."):
            continue
        ext = path.suffix.lower()
        if ext not in IMAGE_EXTS or path.is_dir():
            others.append(path.name)
            continue
        if not _inside(folder, path):
            escaping.append(path.name)
            continue
        pid = path.name[: -len(ext)]
        if pid in seen:
            dupes.append(f"{seen[pid]} and {path.name}")
            continue
        seen[pid] = path.name
        if pid not in row:
            unknown.append(path.name)
            continue
        notes: list[str] = []
        try:
            arr = _load_image(path, notes)
        except ValueError as exc:
            unreadable.append(f"{path.name} ({exc})")
            continue
        if notes:
            converted.append(path.name)
        if arr.shape != (h, w):
            wrong_size.append(f"{path.name} is {arr.shape[0]}x{arr.shape[1]}")
            continue
        images[row[pid], 0] = arr
        mask[row[pid]] = True
    if escaping:
        problems.append(f"images/: links pointing outside the site folder: {_examples(escaping)}")
    if dupes:
        problems.append(f"images/: more than one image for a patient: {_examples(dupes)}")
    if unknown:
        problems.append(f"images/: images for patient_ids not in records.csv: "
                        f"{_examples(unknown)}")
    if unreadable:
        problems.append(f"images/: unreadable image {_examples(unreadable)}")
    if wrong_size:
        problems.append(f"images/: wrong size (site.toml says {h}x{w}): "
                        f"{_examples(wrong_size)}; `mmfed data import --image-size {h} {w}` "
                        "resizes an export")
    if converted:
        warnings.append(f"images/: {len(converted)} image(s) stored as colour with equal "
                        f"channels, read as grayscale: {_examples(converted)}")
    if others:
        warnings.append(f"images/: ignored files that are not .png/.npy/.dcm: "
                        f"{_examples(others)}")
    missing = n - int(mask.sum())
    if missing:
        warnings.append(f"images/: {missing} of {n} patients have no image")
    return images, mask


def _read_genomics(folder: Path, spec: SiteSpec, ids: list[str], problems: list[str],
                   warnings: list[str]) -> tuple[list[str], np.ndarray | None, np.ndarray]:
    n = len(ids)
    mask = np.zeros(n, dtype=bool)
    csv_path, pq_path = folder / "genomics.csv", folder / "genomics.parquet"
    if not spec.has("genomics"):
        if csv_path.exists() or pq_path.exists():
            warnings.append("genomics: file present but modalities.genomics = false "
                            "(ignored)")
        return [], None, mask
    if csv_path.exists() and pq_path.exists():
        problems.append("genomics: both genomics.csv and genomics.parquet exist; keep one")
        return [], None, mask
    frame: pd.DataFrame | None
    fname = csv_path.name if csv_path.exists() else pq_path.name
    if csv_path.exists():
        frame = _read_csv(csv_path, problems)
    elif pq_path.exists():
        try:
            frame = pd.read_parquet(pq_path)
        except Exception as exc:  # pyarrow raises a zoo of types for corrupt files
            problems.append(f"genomics.parquet: unreadable ({type(exc).__name__})")
            return [], None, mask
        frame.columns = [str(c) for c in frame.columns]
        # As text, like a CSV; nulls become "" (pandas >= 3 keeps NaN through astype(str)).
        frame = frame.astype(object).where(frame.notna(), "").astype(str)
    else:
        problems.append("genomics: no genomics.csv or genomics.parquet, but "
                        "modalities.genomics = true in site.toml")
        return [], None, mask
    if frame is None:
        return [], None, mask
    gids = _check_ids(frame, fname, problems)
    genes = [c for c in frame.columns if c != "patient_id"]
    if not genes:
        problems.append(f"{fname}: no gene columns")
        return [], None, mask
    row = {pid: i for i, pid in enumerate(ids)}
    unknown = [g for g in gids if g not in row and bad_id(g) is None]
    if unknown:
        problems.append(f"{fname}: patient_ids not in records.csv: "
                        f"{_examples([repr(u) for u in unknown])}")
    values = np.full((n, len(genes)), np.nan, dtype=np.float32)
    bad_cells: list[str] = []
    src = [i for i, pid in enumerate(gids) if pid in row]
    dst = [row[gids[i]] for i in src]
    block = _to_float_block(frame[genes]) if len(frame) else None
    if block is not None:
        values[dst] = block[src]
    else:
        for j, gene in enumerate(genes):
            col, bad = to_float(frame[gene])
            bad_cells += [f"line {i + 2} column '{gene}'" for i in bad]
            values[dst, j] = col[src]
    if bad_cells:
        problems.append(f"{fname}: non-numeric expression value at {_examples(bad_cells)}")
    for pid in gids:
        if pid in row:
            mask[row[pid]] = True
    missing = n - int(mask.sum())
    if missing:
        warnings.append(f"{fname}: {missing} of {n} patients have no genomic profile")
    gaps = int(np.isnan(values[mask]).sum())
    if gaps:
        warnings.append(f"{fname}: {gaps} missing expression value(s) (imputed)")
    return genes, values, mask


def read_site(folder: Path | str) -> ReadResult:
    """Read and validate one site folder; never raises for bad data."""
    result = _read_site(Path(folder))
    result.problems = [one_line(p) for p in result.problems]
    result.warnings = [one_line(w) for w in result.warnings]
    return result


def _read_site(folder: Path) -> ReadResult:
    if not folder.is_dir():
        return ReadResult(None, [f"{folder}: not a directory"])
    spec, problems = parse_site_spec(folder / "site.toml")
    warnings: list[str] = []
    if spec is None:
        return ReadResult(None, problems, warnings)
    rec = _read_records(folder, spec, problems, warnings)
    if rec is None:
        return ReadResult(None, problems, warnings)
    ids, labels, targets, numeric_cols, numeric, cat_cols, cat_vals = rec
    images, image_mask = _read_images(folder, spec, ids, problems, warnings)
    genes, genomics, genomics_mask = _read_genomics(folder, spec, ids, problems, warnings)
    if problems:
        return ReadResult(None, problems, warnings)
    site = SiteData(spec=spec, ids=ids, labels=labels, numeric_cols=numeric_cols,
                    numeric=numeric, categorical_cols=cat_cols, categorical=cat_vals,
                    images=images, image_mask=image_mask, genes=genes, genomics=genomics,
                    genomics_mask=genomics_mask, targets=targets)
    return ReadResult(site, [], warnings)


def load_site(folder: Path | str) -> SiteData:
    """Read a site folder or raise ``DataError`` naming the first problem."""
    result = read_site(folder)
    if result.site is None:
        extra = len(result.problems) - 1
        more = f" (and {extra} more problem(s); run `mmfed data check {folder}`)" if extra else ""
        raise DataError(one_line(f"{folder}: {result.problems[0]}{more}"), result.problems)
    return result.site


def list_sites(root: Path | str) -> list[Path]:
    """Site folders of a federation folder: every subfolder with a site.toml but holdout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: federation folder not found")
    sites = sorted((p for p in root.iterdir()
                    if p.is_dir() and p.name != "holdout" and (p / "site.toml").exists()),
                   key=_natural_key)
    if not sites:
        raise DataError(f"{root}: no site folders (subfolders with a site.toml)")
    return sites


def _natural_key(path: Path) -> tuple[object, ...]:
    """Sort site-2 before site-10."""
    import re

    parts = re.split(r"(\d+)", path.name)
    return tuple(int(p) if p.isdigit() else p for p in parts)


def outcome_summary(site: SiteData) -> str:
    """The outcome's distribution in a few words, per task kind."""
    spec = site.spec
    if spec.kind == "regression" and site.targets is not None:
        y = site.targets
        return (f"label '{spec.label}': mean {y.mean():.4g}, sd {y.std():.4g}, "
                f"range {y.min():.4g} to {y.max():.4g}")
    if spec.kind == "survival" and site.targets is not None:
        events = int(site.labels.sum())
        unit = f" {spec.unit}" if spec.unit else ""
        return (f"survival: {events} event(s), {len(site) - events} censored; median "
                f"follow-up {float(np.median(site.targets)):.4g}{unit}")
    counts = np.bincount(site.labels, minlength=len(spec.classes))
    return "labels: " + ", ".join(f"{c}: {k} ({k / len(site):.0%})"
                                  for c, k in zip(spec.classes, counts, strict=True))


def summarize(site: SiteData) -> str:
    """One short paragraph for ``mmfed data check``."""
    mods = [f"records ({len(site.numeric_cols)} numeric, {len(site.categorical_cols)} "
            "categorical columns)"]
    if site.images is not None:
        mods.append(f"images ({int(site.image_mask.sum())}/{len(site)} patients)")
    if site.genomics is not None:
        mods.append(f"genomics ({len(site.genes)} genes, {int(site.genomics_mask.sum())}/"
                    f"{len(site)} patients)")
    tag = " [synthetic]" if site.spec.synthetic else ""
    return (f"{site.name}{tag}: {len(site)} patients; modalities: {'; '.join(mods)}; "
            f"{outcome_summary(site)}")
