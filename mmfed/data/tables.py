"""A hospital's own export files (EHR extract, expression matrix) read as text tables.

``mmfed data import`` turns these files into a site folder, and the site reader then
checks that folder with its own rules. This layer therefore keeps every cell as text
(ids such as ``01005`` keep their zeros; nothing is guessed as a number or a date) and
judges values with the reader's rules (``MISSING_MARKERS``, the id rules, the reader's
number parsing), so an import that passes here is a folder that checks clean. Problems
are collected, not raised one at a time: the operator of a hospital export should see
every fault of a file in one run, each as one line.

Expression matrices are wide (20,000 genes x hundreds of samples), so cells travel as
Arrow string arrays and are checked with vectorised Arrow and pandas calls; no Python
loop runs per cell.
"""

from __future__ import annotations

import csv
import difflib
import gc
import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfed.data.reader import MISSING_MARKERS, bad_id, one_line, to_float
from mmfed.errors import DataError

_DELIMITERS = (",", "\t", ";", "|")
_PARQUET_EXTS = (".parquet", ".pq")
_MAX_EXAMPLES = 3
_MAX_COLUMNS_SHOWN = 8
# The sniffer looks at this much text; a longer first line (a wide matrix header) is
# counted instead, which is both faster and just as reliable at that width.
_SNIFF_CHARS = 64 * 1024
_SAMPLE_LINES = 20
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")
# Leading bytes of files that people export by mistake instead of text.
_MAGIC = (
    (b"PAR1", "a Parquet file? name it .parquet"),
    (b"PK\x03\x04", "an Excel workbook or a zip archive? export it as CSV"),
    (b"\x1f\x8b", "gzip-compressed? decompress it first"),
    (b"\xff\xfe", "UTF-16 text? save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text? save it as UTF-8"),
)
_BOM = b"\xef\xbb\xbf"


@dataclass
class Records:
    """The records of one export, renamed to the site folder's columns."""

    frame: pd.DataFrame  # 'patient_id', the outcome columns, then the clinical ones, text
    classes: list[str]  # allowed label values in order; empty unless classifying
    warnings: list[str]  # one line each
    dropped_no_label: int  # rows dropped because an outcome cell was missing
    kind: str = "classification"  # outcome columns: 'label'; survival: 'time', 'event'


@dataclass
class Genomics:
    """The expression rows of the samples that belong to a record, samples x genes."""

    frame: pd.DataFrame  # 'patient_id', then one text column per gene
    orientation: str  # "samples x genes" | "genes x samples" | "gct"
    matched: int  # samples matched to record ids
    unmatched_samples: int  # samples in the file but not in the records (not imported)
    warnings: list[str]


# --------------------------------------------------------------------------- grids


@dataclass
class _Grid:
    """A parsed file before it becomes a DataFrame: the header and one Arrow string
    array per column (body rows only, never null).

    Wide matrices stay in Arrow until the cells that are kept are known, because
    building a pandas column per gene costs seconds at 20,000 genes; ``text`` is kept
    only to turn row positions into the file's line numbers when a message needs them.
    """

    name: str
    header: list[str]
    columns: list[Any]  # pyarrow arrays (large_string)
    text: str | None = None  # the decoded table text; None for Parquet
    delimiter: str = ","
    line_offset: int = 0  # lines before the table text (GCT: 2)
    _lines: list[int] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def place(self, row: int) -> str:
        """Where body row ``row`` (0-based) is in the file, as a person finds it."""
        if self.text is None:
            return f"row {row + 1}"
        return f"line {self.line(row)}"

    def line(self, row: int) -> int:
        if self._lines is None:
            self._lines = _record_lines(self.text or "", self.delimiter)
        # Record 0 is the header; when the count disagrees with the parser's (which
        # should not happen), one record per line is the best remaining guess.
        if len(self._lines) == self.rows + 1:
            return self._lines[row + 1] + self.line_offset
        return row + 2 + self.line_offset


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Creating millions of strings keeps re-triggering the cyclic collector, which then
    walks every live container each time: several times slower on a wide matrix, and
    strings cannot form cycles, so nothing is lost by pausing it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fail(message: str) -> DataError:
    line = one_line(message)
    return DataError(line, [line])


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"{path.name}: cannot be read ({exc.strerror or type(exc).__name__})")\
            from None


def _decode(path: Path, raw: bytes) -> str:
    """The text of a file, or a DataError that says how to fix the export."""
    for magic, hint in _MAGIC:
        if raw.startswith(magic):
            raise _fail(f"{path.name}: binary content, not a text table ({hint})")
    if b"\x00" in raw:
        raise _fail(f"{path.name}: binary content, not a text table")
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + skip
        line = raw[:at].count(b"\n") + 1
        raise _fail(f"{path.name}: not UTF-8 text (byte {at}) on line {line}; save it "
                    "as UTF-8") from None
    if not text.strip():
        raise _fail(f"{path.name}: empty file")
    return text


def _sample(text: str) -> str:
    """The first lines of ``text``: enough for the sniffer and for reading the header
    and the first data row, without scanning a large file."""
    end = 0
    for k in range(_SAMPLE_LINES):
        nxt = text.find("\n", end)
        if nxt < 0:
            return text
        end = nxt + 1
        if k >= 2 and end > 4 * _SNIFF_CHARS:
            break
    return text[:end]


def _first_line(text: str) -> str:
    for line in _LINE_BREAK.split(text, maxsplit=_SAMPLE_LINES):
        if line:
            return line
    return ""


def _detect_delimiter(sample: str) -> str:
    """The sniffer weighs consistency across rows, so a comma inside a tab-separated
    note does not fool it; it can still fail or pick a character the header lacks, and
    then the most frequent candidate of the header line decides."""
    header = _first_line(sample)
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])  # ties: earlier candidate wins
    if counts[best] == 0:
        return ","  # one column: any delimiter reads it the same
    if len(header) < _SNIFF_CHARS:
        snippet = sample[:_SNIFF_CHARS]
        cut = snippet.rfind("\n")
        if 0 < cut < len(snippet) - 1:
            snippet = snippet[:cut]
        try:
            sniffed = csv.Sniffer().sniff(snippet, delimiters="".join(_DELIMITERS)).delimiter
        except csv.Error:
            sniffed = ""
        if sniffed in counts and counts[sniffed] > 0:
            return sniffed
    return best


def _records(sample: str, delimiter: str, count: int) -> list[list[str]]:
    """The first ``count`` non-blank records of a sample (the csv module's view)."""
    out: list[list[str]] = []
    try:
        for rec in csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter):
            if rec:
                out.append(rec)
                if len(out) == count:
                    break
    except csv.Error:
        pass  # a huge or broken field: the Arrow parser reports it properly
    return out


def _record_lines(text: str, delimiter: str) -> list[int]:
    """The line on which each non-blank record starts: quoted notes may span lines,
    so row i is not always line i + 2. Empty when the csv module cannot follow."""
    lines: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    last = 0
    try:
        for rec in reader:
            if rec:
                lines.append(last + 1)
            last = reader.line_num
    except csv.Error:
        return []
    return lines


def _parse_delimited(name: str, text: str, delimiter: str, *, short_header_ok: bool,
                     what: str = "CSV", line_offset: int = 0) -> _Grid:
    """Every cell of a delimited text as a string, the header as the first record.

    The header is read as data (not as names) so that empty and duplicate names reach
    our own checks, and so that a data row longer or shorter than the header is an
    error instead of becoming a silent index column or padding.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    first = _records(_sample(text), delimiter, 2)
    width = len(first[0]) if first else 1
    # R's write.table leaves the corner of a matrix out of the header; in a matrix the
    # first column is only the ids, so its missing name costs nothing.
    short = short_header_ok and len(first) == 2 and len(first[1]) == width + 1
    header_names: list[str] | None = None
    if short:
        header_names = ["", *first[0]]
        width += 1
    data = text.encode("utf-8")

    def read(threads: bool, handler: Any, width: int = width) -> Any:
        # Arrow types every column it is not told about; all of them must stay text.
        types = {f"f{i}": pa.large_string() for i in range(width)}
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True,
                                           skip_rows=1 if short else 0,
                                           use_threads=threads, block_size=1 << 26),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"',
                                              double_quote=True, escape_char=False,
                                              newlines_in_values=True,
                                              ignore_empty_lines=True,
                                              invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(column_types=types,
                                                 strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))

    # Arrow's threads buy nothing here (one 64 MiB block holds any realistic extract),
    # and a process that started Arrow's thread pool was seen to abort at exit on a
    # loaded machine ("terminate called without an active exception").
    try:
        table = read(False, None)
        if table.num_columns != width and not short:
            # The csv module could not read the header (a field beyond its size
            # limit); Arrow's own count is the truth, read again with it.
            width = table.num_columns
            table = read(False, None, width)
    except pa.ArrowException as exc:
        raise _malformed(name, text, delimiter, what, exc, read, short,
                         line_offset) from None
    if table.num_columns != width:
        raise _fail(f"{name}: malformed {what} (cannot tell where the header ends)")
    columns = [_as_text(col) for col in table.columns]
    if header_names is None:
        header_names = [str(v) for v in (col[0].as_py() for col in columns)]
        columns = [col.slice(1) for col in columns]
    return _Grid(name=name, header=[h.strip() for h in header_names], columns=columns,
                 text=text, delimiter=delimiter, line_offset=line_offset)


def _malformed(name: str, text: str, delimiter: str, what: str, exc: Exception,
               read: Any, short: bool, line_offset: int) -> DataError:
    """One line naming the rows whose field count differs from the header's.

    The fast threaded parse stops at the first bad row without saying where; a second,
    single-threaded pass collects every bad row with its record number."""
    bad: list[tuple[int, int, int | None, str]] = []

    def note(row: Any) -> str:
        bad.append((row.expected_columns, row.actual_columns, row.number, row.text))
        return "skip"

    try:
        read(False, note)
    except Exception:  # pyarrow raises several types; the first message is kept below
        pass
    if not bad:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"{name}: malformed {what} ({detail[:200]})")
    lines = _record_lines(text, delimiter)
    places: list[str] = []
    for _expected, actual, number, _row in bad:
        index = None if number is None else number - 1  # Arrow counts skipped rows too
        line = lines[index] if index is not None and 0 <= index < len(lines) else None
        where = f"line {line + line_offset}" if line is not None else "a row"
        places.append(f"{where} has {actual} field{'s' if actual != 1 else ''}")
    # A header one name short was taken for a matrix's: the first data row sets the width.
    model = "first data row" if short else "header"
    quote = " (an unclosed quote?)" if any(r.count('"') % 2 for *_, r in bad) else ""
    return _fail(f"{name}: malformed {what}: {len(bad)} row(s) with a different number of "
                 f"fields than the {model}'s {bad[0][0]}: {_examples(places, len(bad))}"
                 f"{quote}")


def _as_text(col: Any) -> Any:
    """One column as a non-null Arrow large_string array ('' for null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.large_string())
    if col.null_count:
        col = pc.fill_null(col, "")
    return col


def _read_parquet(path: Path) -> _Grid:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises a zoo of types for corrupt files
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise _fail(f"{path.name}: unreadable Parquet file ({type(exc).__name__}"
                    f"{': ' + detail if detail else ''})") from None
    header: list[str] = []
    columns: list[Any] = []
    unusable: list[str] = []
    for col_name, col in zip(table.column_names, table.columns, strict=True):
        if _PANDAS_INDEX.fullmatch(str(col_name)):
            continue  # pandas' unnamed index, not a column of the export
        try:
            columns.append(_as_text(col))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            unusable.append(f"{col_name!r} ({col.type})")
            continue
        header.append(str(col_name).strip())
    if unusable:
        raise _fail(f"{path.name}: column(s) whose values are not plain cells (text, "
                    f"numbers, dates): {_examples(unusable)}")
    if not header:
        raise _fail(f"{path.name}: empty file (no columns)")
    return _Grid(name=path.name, header=header, columns=columns)


def _read_gct(path: Path, text: str) -> _Grid:
    """GCT 1.2: '#1.2', '<genes>\\t<samples>', 'Name\\tDescription\\t<samples>', genes."""
    parts = _LINE_BREAK.split(text, maxsplit=2)
    if len(parts) < 3:
        raise _fail(f"{path.name}: malformed GCT (fewer than 3 lines)")
    version, dims, body = parts[0].strip(), parts[1].strip(), parts[2]
    if version != "#1.2":
        if version.startswith("#1."):
            raise _fail(f"{path.name}: GCT version {version[1:]} is not supported (only "
                        "1.2); export it as GCT 1.2 or as a CSV")
        raise _fail(f"{path.name}: not a GCT 1.2 file (line 1 is {version[:40]!r}, "
                    "expected '#1.2')")
    sizes = dims.split()
    if len(sizes) != 2 or not all(s.isdigit() for s in sizes):
        raise _fail(f"{path.name}: malformed GCT (line 2 should be '<genes><TAB><samples>', "
                    f"got {dims[:40]!r})")
    genes, samples = int(sizes[0]), int(sizes[1])
    grid = _parse_delimited(path.name, body, "\t", short_header_ok=False, what="GCT",
                            line_offset=2)
    head = grid.header
    if len(head) < 2 or head[0].casefold() != "name" or head[1].casefold() != "description":
        raise _fail(f"{path.name}: malformed GCT (line 3 should start with "
                    "'Name<TAB>Description')")
    grid.header = ["Name", *head[2:]]
    grid.columns = [grid.columns[0], *grid.columns[2:]]
    if (grid.rows, len(grid.header) - 1) != (genes, samples):
        raise _fail(f"{path.name}: malformed GCT (line 2 says {genes} genes x {samples} "
                    f"samples, the file has {grid.rows} x {len(grid.header) - 1})")
    return grid


def _load(path: Path, *, matrix: bool) -> _Grid:
    """Any supported file as a grid; ``matrix`` relaxes the header rules that only
    make sense once the orientation is known (see ``read_genomics``)."""
    ext = path.suffix.lower()
    if ext in _PARQUET_EXTS:
        if not path.is_file():
            _read_bytes(path)  # the same 'cannot be read' message as for text
        grid = _read_parquet(path)
    else:
        text = _decode(path, _read_bytes(path))
        if ext == ".gct":
            grid = _read_gct(path, text)
        else:
            delimiter = _detect_delimiter(_sample(text))
            grid = _parse_delimited(path.name, text, delimiter, short_header_ok=matrix,
                                    what="TSV" if delimiter == "\t" else "CSV")
    _check_header(grid, blank_first_ok=matrix, duplicates_ok=matrix)
    return grid


def _check_header(grid: _Grid, *, blank_first_ok: bool, duplicates_ok: bool) -> None:
    empty = [str(i + 1) for i, h in enumerate(grid.header)
             if not h and not (blank_first_ok and i == 0)]
    if empty:
        raise _fail(f"{grid.name}: header has an empty column name (column "
                    f"{', '.join(empty[:_MAX_EXAMPLES])})")
    if not duplicates_ok:
        counts = Counter(grid.header)
        dupes = [h for h, c in counts.items() if c > 1]
        if dupes:
            raise _fail(f"{grid.name}: duplicate column names in header: "
                        f"{_examples([repr(d) for d in dupes])}")


def _object_block(columns: list[Any], rows: int) -> np.ndarray:
    """Columns of equal length as one (rows, columns) object array of Python str.

    One conversion of one concatenated array instead of one per column: a pandas frame
    built from a single object block costs milliseconds even at 20,000 columns.
    """
    import pyarrow as pa

    if not columns:
        return np.empty((rows, 0), dtype=object)
    with _gc_paused():
        flat = pa.concat_arrays(columns).to_numpy(zero_copy_only=False)
    return flat.reshape(len(columns), rows).T


def _frame(grid: _Grid) -> pd.DataFrame:
    block = _object_block(grid.columns, grid.rows)
    return pd.DataFrame(block, columns=grid.header, dtype=object)


def read_table(path: Path) -> pd.DataFrame:
    """Every cell as text ('' for an empty or null cell), the stripped header as names.

    Text is never typed on the way in: a guessed number would drop the zeros of an id
    like ``01005`` and a guessed date would rewrite it. Parquet (.parquet, .pq) values
    are turned into text by Arrow; .gct is read as GCT 1.2 (genes x samples, first
    column 'Name', Description dropped); any other file as delimited UTF-8 text (BOM
    and CRLF accepted, delimiter detected among ',', tab, ';', '|'). Raises DataError
    with a one-line message naming the file for an unreadable, binary, non-UTF-8, empty
    or malformed file and for empty or duplicate header names.
    """
    return _frame(_load(Path(path), matrix=False))


# --------------------------------------------------------------------------- messages


def _examples(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:_MAX_EXAMPLES])
    more = total - min(len(items), _MAX_EXAMPLES)
    return shown + (f" and {more} more" if more > 0 else "")


def _places(grid: _Grid, rows: list[int]) -> str:
    """'line 5' or 'lines 5, 9, 12 and 3 more' (rows for Parquet)."""
    shown = [grid.place(r) for r in rows[:_MAX_EXAMPLES]]
    unit = shown[0].split()[0] if shown else "line"
    numbers = [s.split()[1] for s in shown]
    more = len(rows) - len(shown)
    text = f"{unit}{'s' if len(rows) > 1 else ''} {', '.join(numbers)}"
    return text + (f" and {more} more" if more > 0 else "")


def _columns_hint(columns: list[str], wanted: str) -> str:
    shown = ", ".join(repr(c) for c in columns[:_MAX_COLUMNS_SHOWN])
    more = len(columns) - _MAX_COLUMNS_SHOWN
    listing = shown + (f" and {more} more" if more > 0 else "")
    close = [c for c in columns if c.casefold() == wanted.strip().casefold()]
    close = close or difflib.get_close_matches(wanted, columns, n=1, cutoff=0.8)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"columns: {listing}{guess}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- records


def _integer_value(text: str) -> int | None:
    """The integer a label means, so '1', '1.0', '+1' and '1e0' are all class 1."""
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text):
        value = float(text)
        if np.isfinite(value) and value.is_integer():
            return int(value)
    return None


# Survival event spellings an EHR extract uses, compared case-insensitively after
# stripping; any number equal to 1 or 0 ("1.0", "0.0") is accepted as well.
EVENT_WORDS: dict[str, str] = {"1": "1", "0": "0", "true": "1", "false": "0",
                               "yes": "1", "no": "0"}


@dataclass(frozen=True)
class _Outcome:
    """One outcome column of the export: where it is read from and what it becomes."""

    source: str  # the export's column
    target: str  # the site folder's column: 'label', 'time' or 'event'
    flag: str  # the command-line flag that named it, for messages


def _outcomes(kind: str, label: str, time: str, event: str) -> list[_Outcome]:
    if kind == "survival":
        return [_Outcome(time, "time", "--time-column"),
                _Outcome(event, "event", "--event-column")]
    if kind in ("classification", "regression"):
        return [_Outcome(label, "label", "--label")]
    raise ValueError(f"unknown task kind {kind!r}")


def _number(text: str) -> float | None:
    """The number an outcome cell holds, by the site reader's parse (``float`` of the
    stripped text), or None. Infinity, NaN and values beyond float32 are refused: the
    model holds outcomes as float32, where they would silently become infinity."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if abs(value) <= _FLOAT32_MAX else None


def _event(text: str) -> str | None:
    """'1' (event) or '0' (censored) for an accepted spelling, else None."""
    word = EVENT_WORDS.get(text.casefold())
    if word is not None:
        return word
    value = _number(text)
    if value == 1.0:
        return "1"
    if value == 0.0:
        return "0"
    return None


def _bad_values(grid: _Grid, rows: list[int], texts: list[str],
                ok: Callable[[str], bool]) -> tuple[int, list[str]]:
    """How many of the kept cells fail ``ok``, and the first few as 'line 5 ('x')'."""
    shown: list[str] = []
    n_bad = 0
    for row, text in zip(rows, texts, strict=True):
        if ok(text):
            continue
        n_bad += 1
        if len(shown) < _MAX_EXAMPLES:
            shown.append(f"{grid.place(row)} ({text!r})")
    return n_bad, shown


def _class_values(grid: _Grid, label: str, keep: list[int], present: list[str],
                  classes: list[str] | None, problems: list[str],
                  warnings: list[str]) -> tuple[list[str], list[str]]:
    """The classification labels as class names, and the classes in order."""
    name = grid.name
    canonical: list[str] = list(present)
    n_outside = 0
    if classes is not None:
        allowed = [c.strip() for c in classes]
        if len(allowed) < 2:
            problems.append(f"--classes {','.join(allowed)}: give at least 2 classes")
        if any(not c for c in allowed) or len(set(allowed)) != len(allowed):
            problems.append(f"--classes {','.join(allowed)}: give distinct, non-empty values")
        by_int: dict[int, str] = {}
        if allowed and all(_INTEGER.fullmatch(c) for c in allowed):
            for c in allowed:
                by_int.setdefault(int(c), c)
        allowed_set = set(allowed)
        outside: list[str] = []
        for i, (row, text) in enumerate(zip(keep, present, strict=True)):
            if text in allowed_set:
                continue
            value = _integer_value(text) if by_int else None
            if value is not None and value in by_int:
                canonical[i] = by_int[value]
                continue
            n_outside += 1
            if len(outside) < _MAX_EXAMPLES:
                outside.append(f"{grid.place(row)} ({text!r})")
        if n_outside:
            problems.append(f"{name}: label outside --classes {allowed} in {label!r} at "
                            f"{_examples(outside, n_outside)}")
        final = allowed
        absent = [c for c in allowed if c not in set(canonical)]
        if absent and not n_outside:
            warnings.append(f"{name}: class(es) without patients: "
                            f"{', '.join(repr(c) for c in absent)}")
    else:
        distinct = list(dict.fromkeys(present))
        values = [_integer_value(t) for t in distinct]
        if distinct and all(v is not None for v in values):
            as_int = {t: str(v) for t, v in zip(distinct, values, strict=True)}
            canonical = [as_int[t] for t in present]
            final = sorted(set(as_int.values()), key=int)
        else:
            final = sorted(distinct)
            folded: dict[str, list[str]] = {}
            for t in final:
                folded.setdefault(t.casefold(), []).append(t)
            variants = [", ".join(repr(v) for v in vs) for vs in folded.values() if len(vs) > 1]
            if variants:
                warnings.append(f"{name}: label values that differ only in case are "
                                f"different classes: {'; '.join(variants[:_MAX_EXAMPLES])}")
    # A small site may see one outcome only; with the federation's classes given it
    # still trains (the other sites hold the rest), so only a guess is refused.
    if keep and len(set(canonical)) < 2 and not n_outside and classes is None:
        problems.append(f"{name}: every patient has the label {canonical[0]!r} in "
                        f"{label!r}; give the federation's classes with --classes")
    return canonical, list(final)


def read_records(path: Path, id_column: str, label: str,
                 classes: list[str] | None, *, kind: str = "classification",
                 time: str = "", event: str = "") -> Records:
    """The export's records as the site folder's columns, or a DataError listing every
    problem (its message is the first).

    The id column becomes 'patient_id'; the outcome becomes 'label' (classification,
    regression) or 'time' and 'event' (survival, from ``time`` and ``event``; ``label``
    is then unused); the rest are clinical columns kept as text. A row without its
    outcome (any outcome cell missing) is dropped, with a warning that counts it,
    because an outcome that was not recorded cannot train. Rows with every cell empty
    (spreadsheet leftovers) are ignored with a warning. Outcome cells are stripped.

    - classification: when the classes are integers, '1.0' is class '1'. Default
      classes are the distinct labels, sorted numerically when all are integers (so
      '2' < '10'), else as text.
    - regression: every label must be a finite number (``float`` of the text, within
      float32); the text is kept as written.
    - survival: every time must be a finite number > 0 (text kept); every event one of
      1/0, true/false, yes/no (any case) or a number equal to 1 or 0, written as '1'
      (event) or '0' (censored).

    Outcome values are checked here, by the site reader's rules, so that a fault is
    reported against the export's own lines rather than as a failed check of a folder
    the operator never saw.
    """
    path = Path(path)
    outcomes = _outcomes(kind, label, time, event)
    grid = _load(path, matrix=False)
    name = grid.name
    frame = _frame(grid)
    columns = list(grid.header)
    problems: list[str] = []
    warnings: list[str] = []

    if id_column not in columns:
        problems.append(f"{name}: no id column {id_column!r} (--id-column); "
                        f"{_columns_hint(columns, id_column)}")
    for o in outcomes:
        if o.source not in columns:
            problems.append(f"{name}: no {o.target} column {o.source!r} ({o.flag}); "
                            f"{_columns_hint(columns, o.source)}")
    named = [("--id-column", id_column)] + [(o.flag, o.source) for o in outcomes]
    same = False
    for i, (flag_a, col_a) in enumerate(named):
        for flag_b, col_b in named[i + 1:]:
            if col_a == col_b:
                same = True
                problems.append(f"{name}: {flag_a} and {flag_b} name the same column "
                                f"{col_a!r}")
    roles = {"patient_id": ("id", id_column)} | {o.target: (o.target, o.source)
                                                 for o in outcomes}
    sources = [o.source for o in outcomes]
    for col in columns:
        if col in roles and col not in (id_column, *sources):
            role, source = roles[col]
            problems.append(f"{name}: column {col!r} would collide with the {role} column "
                            f"(the import renames {source!r} to {col!r}); rename it in "
                            "the export")
    if problems and (same or any(c not in columns for c in (id_column, *sources))):
        raise DataError(one_line(problems[0]), [one_line(p) for p in problems])

    stripped = {c: frame[c].str.strip() for c in columns}
    empty_row = np.logical_and.reduce([stripped[c].isin(MISSING_MARKERS).to_numpy()
                                       for c in columns])
    n_empty = int(empty_row.sum())
    if n_empty:
        warnings.append(f"{name}: {_plural(n_empty, 'empty row')} ignored (every cell "
                        f"empty): {_places(grid, np.flatnonzero(empty_row).tolist())}")

    ids = frame[id_column].tolist()
    bad: dict[str, list[int]] = {}
    seen: dict[str, list[int]] = {}
    for row, pid in enumerate(ids):
        if empty_row[row]:
            continue
        why = bad_id(pid)
        if why is not None:
            bad.setdefault(why, []).append(row)
        else:
            seen.setdefault(pid, []).append(row)
    for why, rows in bad.items():
        if why == "empty":
            problems.append(f"{name}: missing patient id ({id_column!r} empty) at "
                            f"{_places(grid, rows)}")
        else:
            shown = ", ".join(f"{grid.place(r)} ({ids[r]!r})" for r in rows[:_MAX_EXAMPLES])
            more = len(rows) - _MAX_EXAMPLES
            problems.append(f"{name}: patient id {why} at {shown}"
                            f"{f' and {more} more' if more > 0 else ''}")
    dupes = [(pid, rows) for pid, rows in seen.items() if len(rows) > 1]
    if dupes:
        shown_d = [f"{pid!r} ({_places(grid, rows)})" for pid, rows in dupes]
        problems.append(f"{name}: duplicate patient ids in {id_column!r}: "
                        f"{_examples(shown_d)}")

    missing = np.logical_or.reduce([stripped[s].isin(MISSING_MARKERS).to_numpy()
                                    for s in sources]) & ~empty_row
    without = (f"a label in {label!r}" if kind != "survival"
               else f"a time in {time!r} or an event in {event!r}")
    lacking = "a label" if kind != "survival" else "a time or an event"
    dropped = int(missing.sum())
    if dropped:
        warnings.append(f"{name}: {_plural(dropped, 'patient')} without {without} "
                        f"(dropped): {_places(grid, np.flatnonzero(missing).tolist())}")
    keep = np.flatnonzero(~missing & ~empty_row).tolist()
    present = {s: [stripped[s].iat[r] for r in keep] for s in sources}

    final: list[str] = []
    values: dict[str, list[str]] = {o.target: present[o.source] for o in outcomes}
    if kind == "classification":
        values["label"], final = _class_values(grid, label, keep, present[label], classes,
                                               problems, warnings)
    elif kind == "regression":
        n_bad, examples = _bad_values(grid, keep, present[label],
                                   lambda t: _number(t) is not None)
        if n_bad:
            problems.append(f"{name}: regression label in {label!r} must be a finite number "
                            f"at {_examples(examples, n_bad)}")
    else:
        def positive(text: str) -> bool:
            value = _number(text)
            return value is not None and value > 0

        n_bad, examples = _bad_values(grid, keep, present[time], positive)
        if n_bad:
            problems.append(f"{name}: survival time in {time!r} must be a number > 0 at "
                            f"{_examples(examples, n_bad)}")
        n_bad, examples = _bad_values(grid, keep, present[event], lambda t: _event(t) is not None)
        if n_bad:
            problems.append(f"{name}: event in {event!r} must be 1/0, true/false or yes/no "
                            f"(1 = event, 0 = censored) at {_examples(examples, n_bad)}")
        else:
            values["event"] = [_event(t) or "0" for t in present[event]]
            if keep and "1" not in values["event"]:
                warnings.append(f"{name}: no events in {event!r} (every patient censored)")
    if not keep:
        why_none = ("the file has no rows" if grid.rows == 0
                    else f"all {_plural(grid.rows, 'row')} lack {lacking} or are empty")
        problems.append(f"{name}: no patients ({why_none})")

    if problems:
        raise DataError(one_line(problems[0]), [one_line(p) for p in problems])

    clinical = [c for c in columns if c not in (id_column, *sources)]
    out = frame.iloc[keep][clinical].reset_index(drop=True)
    for o in reversed(outcomes):
        out.insert(0, o.target, pd.Series(values[o.target], dtype=object))
    out.insert(0, "patient_id", pd.Series([ids[r] for r in keep], dtype=object))
    return Records(frame=out, classes=final, warnings=[one_line(w) for w in warnings],
                   dropped_no_label=dropped, kind=kind)


# --------------------------------------------------------------------------- genomics


def _counted(values: list[str], quote: bool) -> list[str]:
    """'TP53 (2x)' for each value that occurs more than once, in first-seen order."""
    return [f"{repr(v) if quote else v} ({c}x)" for v, c in Counter(values).items() if c > 1]


def _no_match(grid: _Grid, first: list[str], head: list[str], record_ids: list[str],
              gct: bool) -> DataError:
    def ex(ids: list[str]) -> str:
        return ", ".join(repr(i) for i in ids[:_MAX_EXAMPLES]) or "none"

    if gct:
        tried = f"gct: sample ids in the header, e.g. {ex(head)}"
    else:
        tried = (f"samples x genes: first-column ids, e.g. {ex(first)}; genes x samples: "
                 f"header ids, e.g. {ex(head)}")
    wanted = {r.lstrip("0").casefold() for r in record_ids}
    sides = (head,) if gct else (first, head)
    loose = any(i.lstrip("0").casefold() in wanted for side in sides for i in side if i)
    hint = ("; some match if case and leading zeros are ignored (were the ids reformatted, "
            "e.g. by a spreadsheet?)" if loose else "")
    return _fail(f"{grid.name}: no sample ids match the records (tried {tried}; record ids, "
                 f"e.g. {ex(record_ids)}){hint}")


def _check_numbers(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Which cells are missing and which are not numbers, by the site reader's rules.

    Arrow's parse is the fast path. It accepts only text that the reader's parser also
    accepts (and only spaces and tabs are trimmed first, both of which the reader strips
    too), so when it fails, on a bad cell or on other padding, the reader's own parser
    decides cell by cell.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    markers = pa.array(sorted(MISSING_MARKERS), type=pa.large_string())
    trimmed = pc.utf8_trim(values, characters=" \t")
    missing_arr = pc.is_in(trimmed, value_set=markers)
    try:
        parsed = pc.cast(pc.if_else(missing_arr, None, trimmed), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        with _gc_paused():
            text = pd.Series(values.to_numpy(zero_copy_only=False), dtype=object)
        _, bad_rows = to_float(text)
        missing = text.str.strip().isin(MISSING_MARKERS).to_numpy()
        bad = np.zeros(len(text), dtype=bool)
        bad[bad_rows] = True
        return missing, bad
    missing = missing_arr.to_numpy(zero_copy_only=False)
    numbers = parsed.to_numpy(zero_copy_only=False)
    bad = ~missing & ~(np.abs(numbers) <= _FLOAT32_MAX)  # NaN, inf, beyond float32
    return missing, bad


def read_genomics(path: Path, record_ids: list[str]) -> Genomics:
    """The expression rows of the records' patients, samples x genes, values as text.

    The orientation is whichever of the first column and the header holds more record
    ids (GCT is always genes x samples): exports come both ways round and nothing else
    tells them apart reliably. Sample ids and gene ids are stripped. A blank corner
    cell, or a header one name short (R's write.table), is accepted: the first column
    only holds ids. Raises DataError listing every problem: no id matching the records,
    duplicate gene or sample ids, a gene named 'patient_id', an empty gene id, or cells
    of kept samples that are neither numbers (within float32) nor missing markers.
    Samples that are not in the records are dropped and counted; rows keep the file's
    order.
    """
    import pyarrow as pa

    path = Path(path)
    grid = _load(path, matrix=True)
    name = grid.name
    gct = path.suffix.lower() == ".gct"
    if len(grid.header) < 2 or grid.rows == 0:
        raise _fail(f"{name}: no expression values (need an id column and at least one "
                    "more column and row)")
    if not record_ids:
        raise _fail(f"{name}: no record ids to match the samples to")
    with _gc_paused():
        first = [str(v).strip() for v in grid.columns[0].to_pylist()]
    head = grid.header[1:]
    wanted = set(record_ids)
    by_rows = 0 if gct else len({i for i in first if i in wanted})
    by_cols = len({i for i in head if i in wanted})
    if by_rows == 0 and by_cols == 0:
        raise _no_match(grid, first, head, record_ids, gct)
    if by_rows == by_cols:
        raise _fail(f"{name}: cannot tell samples from genes: {by_rows} record ids are in "
                    "the first column and as many in the header")
    samples_in_rows = by_rows > by_cols
    orientation = "gct" if gct else ("samples x genes" if samples_in_rows
                                     else "genes x samples")
    problems: list[str] = []
    if samples_in_rows:
        samples, genes = first, head
    else:
        samples, genes = head, first
        empty = [r for r, g in enumerate(genes) if not g]
        if empty:
            problems.append(f"{name}: empty gene id at {_places(grid, empty)}")
    if "patient_id" in genes:
        problems.append(f"{name}: a gene is named 'patient_id', which is the id column of "
                        "the site folder's genomics.csv; rename it")
    dup_genes = _counted([g for g in genes if g], quote=False)
    if dup_genes:
        problems.append(f"{name}: duplicate gene ids: {_examples(dup_genes)}")
    dup_samples = _counted([s for s in samples if s], quote=True)
    if dup_samples:
        problems.append(f"{name}: duplicate sample ids: {_examples(dup_samples)}")

    matched = [i for i, s in enumerate(samples) if s in wanted]
    n_genes = len(genes)
    if samples_in_rows:
        # Columns are genes; gather the kept samples' cells sample by sample.
        flat = pa.concat_arrays(grid.columns[1:])
        index = (np.arange(n_genes, dtype=np.int64)[None, :] * grid.rows
                 + np.asarray(matched, dtype=np.int64)[:, None]).ravel()
        values = flat.take(pa.array(index))
    else:
        values = pa.concat_arrays([grid.columns[1 + j] for j in matched])
    missing, bad = _check_numbers(values)
    n_bad = int(bad.sum())
    if n_bad:
        shown: list[str] = []
        for k in np.flatnonzero(bad)[:_MAX_EXAMPLES].tolist():
            s, g = divmod(k, n_genes)
            shown.append(f"(sample {samples[matched[s]]!r}, gene {genes[g]!r}) "
                         f"{values[k].as_py()!r}")
        problems.append(f"{name}: {_plural(n_bad, 'expression value')} neither a number "
                        f"(within float32) nor missing: {_examples(shown, n_bad)}")
    if problems:
        raise DataError(one_line(problems[0]), [one_line(p) for p in problems])

    warnings: list[str] = []
    unmatched = len(samples) - len(matched)
    if unmatched:
        others = [repr(s) for i, s in enumerate(samples) if s not in wanted][:_MAX_EXAMPLES]
        warnings.append(f"{name}: {_plural(unmatched, 'sample')} not in the records (not "
                        f"imported): {_examples(others, unmatched)}")
    without = len(wanted) - len({samples[i] for i in matched})
    if without:
        warnings.append(f"{name}: {without} of {len(wanted)} patients have no genomic "
                        "profile")
    gaps = int(missing.sum())
    if gaps:
        warnings.append(f"{name}: {_plural(gaps, 'missing expression value')} (imputed "
                        "when training)")

    block = np.empty((len(matched), n_genes + 1), dtype=object)
    block[:, 0] = [samples[i] for i in matched]
    if matched:
        with _gc_paused():
            cells = values.to_numpy(zero_copy_only=False)
        block[:, 1:] = cells.reshape(len(matched), n_genes)
    frame = pd.DataFrame(block, columns=["patient_id", *genes], dtype=object)
    return Genomics(frame=frame, orientation=orientation, matched=len(matched),
                    unmatched_samples=unmatched,
                    warnings=[one_line(w) for w in warnings])
