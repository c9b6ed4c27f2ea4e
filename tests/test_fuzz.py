"""Fuzzing the three readers of user input: run config, site policy and site folder.

Each gets ``MMFED_FUZZ_CASES`` (default 10,000) derandomized hypothesis cases, so CI
is deterministic. The property is the project's error contract: a reader either
returns a valid result or raises an ``MmfedError`` whose message is one non-empty
line; any other exception, or a multi-line message, is a bug. Inputs are random
documents built from the real key space (so most reach the type and range checks,
not just the TOML parser), then mangled at the byte level.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import string
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfed.config import DEFAULTS, SITE_POLICY_FIELDS, RunConfig
from mmfed.data.reader import SiteData, load_site, read_site
from mmfed.errors import MmfedError
from mmfed.privacy.policy import FIELDS, PrivacyPolicy, load_policy

CASES = int(os.environ.get("MMFED_FUZZ_CASES", "10000"))
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


def one_line(exc: BaseException) -> None:
    """The error contract: an MmfedError with one non-empty line of text."""
    assert isinstance(exc, MmfedError), f"{type(exc).__name__} escaped: {exc!r}"
    text = str(exc)
    assert text.strip(), "empty error message"
    assert len(text.splitlines()) == 1, f"multi-line error message: {text!r}"


@contextmanager
def contract() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # anything but a clean MmfedError fails the property
        one_line(exc)


# --------------------------------------------------------------------------- values

NASTY_TEXT = st.sampled_from(["", " ", "\n", "\r\n", "\x00", "\ufeff", "\u2028", "é", "💥",
                              "1e400", "-0", "nan", "inf", "NaN", "NA", ".", "..", "/etc",
                              "a\\b", "0x10", "1_000", "true", "[1,2]", "{}", "'", '"',
                              "9" * 400, "9" * 5000, "null", "None", "\t", "\udcff"])
TEXT = st.one_of(st.text(max_size=30), NASTY_TEXT)
SCALARS = st.one_of(
    st.booleans(), st.integers(), st.integers(-5, 5), st.integers(min_value=2**63 - 2),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2), TEXT,
    st.dates(), st.datetimes(), st.times())
# Two levels of nesting reach every type check; deeper trees only cost generation time.
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                   st.dictionaries(TEXT, st.one_of(SCALARS, st.lists(SCALARS, max_size=2)),
                                   max_size=3))


def toml_key(part: str) -> str:
    if part and all(c in string.ascii_letters + string.digits + "_-" for c in part):
        return part
    return json.dumps(part, ensure_ascii=False)


def toml_literal(value: Any) -> str:
    """A TOML spelling of ``value`` (deliberately not mmfed's own writer)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_literal(v)}"
                               for k, v in value.items()) + "}"
    return value.isoformat()  # type: ignore[no-any-return]  # date, datetime, time


def toml_document(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"{'.'.join(toml_key(p) for p in key.split('.'))} = {toml_literal(v)}"
                     for key, v in pairs) + "\n"


HOW = st.sampled_from(["keep", "keep", "keep", "cut", "splice", "random", "bom"])
FORMS = st.integers(0, 3)  # how a --set item is written (see the config test)


def mangle(draw: Callable[[st.SearchStrategy[Any]], Any], text: str) -> bytes:
    """``text`` as UTF-8, maybe cut, spliced or replaced at the byte level.

    A plain function taking ``draw`` (not a composite strategy): building a new
    strategy object per case costs hypothesis a validation pass every time.
    """
    data = text.encode("utf-8", "surrogatepass")
    how = draw(HOW)
    if how == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    elif how == "random":
        data = draw(st.binary(max_size=64))
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


# --------------------------------------------------------------------------- run config

SITE_KEYS = [f"privacy.site.{site}.{field}" for site in ("site-1", "x", "a_b")
             for field in (*SITE_POLICY_FIELDS, "budget")]
KEYS = st.one_of(st.sampled_from(sorted(DEFAULTS)), st.sampled_from(SITE_KEYS),
                 TEXT.map(lambda t: f"data.{t}"), TEXT)


@functools.cache
def valid_for(key: str) -> st.SearchStrategy[Any]:
    """Values of the key's own type, so that range checks are reached too."""
    base = key if key in DEFAULTS else f"privacy.{key.rsplit('.', 1)[-1]}"
    default = DEFAULTS.get(base)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(-10, 2**31), st.integers())
    if isinstance(default, float):
        return st.one_of(st.floats(), st.integers(), st.floats(0, 1))
    if isinstance(default, list):
        return st.lists(st.one_of(TEXT, st.sampled_from(
            ["images", "records", "genomics", "genomics@site-2", "site-1:1:nan",
             "site-1:x:huge", "s:1:train", "s:²:mask"])), max_size=3)
    return TEXT


@functools.cache
def value_for(key: str) -> st.SearchStrategy[Any]:
    """The key's own type or anything at all (cached: strategies are costly to build)."""
    return st.one_of(valid_for(key), VALUES)


@st.composite
def config_pairs(draw: st.DrawFn) -> list[tuple[str, Any]]:
    pairs = []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(KEYS)
        value = draw(value_for(key))
        pairs.append((key, value))
    return pairs


def check_config(cfg: RunConfig, round_trip: bool = False) -> None:
    """A loaded config holds only known keys with their default's type, and it reproduces
    itself through ``config.toml`` (what a run directory keeps)."""
    for key, value in cfg.values.items():
        base = key if key in DEFAULTS else f"privacy.{key.rsplit('.', 1)[-1]}"
        assert type(value) is type(DEFAULTS[base]), (key, value)
    if not round_trip:
        return
    again = RunConfig()
    for name, item in flatten(tomllib.loads(cfg.to_toml())).items():
        again.set(name, item)
    assert again.values == cfg.values


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Real files, on tmpfs where there is one: each case writes a few, and on a disk-
    backed /tmp that costs milliseconds apiece, more than the reading under test."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="mmfed-fuzz-", dir=base) as tmp:
        yield Path(tmp)


@FUZZ
@given(pairs=config_pairs(), data=st.data())
def test_fuzz_config_loader(scratch: Path, pairs: list[tuple[str, Any]],
                            data: st.DataObject) -> None:
    # 1. As a TOML file (nested tables written as dotted keys), perhaps mangled.
    path = scratch / "config.toml"
    path.write_bytes(mangle(data.draw, toml_document(pairs)))
    with contract():
        check_config(RunConfig.load(path))
    # 2. As Flower's run config (scalars; lists as comma-joined text).
    with contract():
        check_config(RunConfig.from_flower(dict(pairs)))
    # 3. As --set KEY=VALUE strings, the value written as TOML or as free text.
    overrides = []
    for k, v in pairs:
        form = data.draw(FORMS)
        overrides.append(f"{k}={toml_literal(v)}" if form == 0 else f"{k}={v}" if form == 1
                         else data.draw(TEXT) if form == 2 else f"{k}={data.draw(TEXT)}")
    with contract():
        check_config(RunConfig.load(None, overrides=overrides))
    # 4. Straight into RunConfig.set, one key at a time (what was accepted must survive
    #    the trip through config.toml).
    cfg = RunConfig()
    for key, value in pairs:
        with contract():
            cfg.set(key, value)
    check_config(cfg, round_trip=True)


# --------------------------------------------------------------------------- site policy


@st.composite
def policy_document(draw: st.DrawFn) -> str:
    keys = st.one_of(st.sampled_from(FIELDS), TEXT)
    values = {}
    for _ in range(draw(st.integers(0, 6))):
        key = draw(keys)
        values[key] = draw(value_for(f"privacy.{key}") if key in FIELDS else VALUES)
    layout = draw(st.sampled_from(["top", "table", "table+extra", "not-a-table"]))
    if layout == "top":
        return toml_document(list(values.items()))
    if layout == "not-a-table":
        return f"privacy = {toml_literal(draw(SCALARS))}\n"
    body = "[privacy]\n" + toml_document(list(values.items()))
    if layout == "table+extra":
        body = f"{toml_key(draw(TEXT))} = {toml_literal(draw(SCALARS))}\n" + body
    return body


POLICY_DOCUMENTS = policy_document()


@FUZZ
@given(data=st.data())
def test_fuzz_site_policy(scratch: Path, data: st.DataObject) -> None:
    path = scratch / "policy.toml"
    path.write_bytes(mangle(data.draw, data.draw(POLICY_DOCUMENTS)))
    try:
        policy = load_policy(path)
    except Exception as exc:
        one_line(exc)
        return
    assert isinstance(policy, PrivacyPolicy)
    assert 0 < policy.epsilon <= 1000 and 0 < policy.delta < 1
    assert 0 < policy.max_grad_norm <= 1000 and 0.1 <= policy.max_noise_multiplier <= 1000
    assert isinstance(policy.enabled, bool) and isinstance(policy.accountant, str)


# --------------------------------------------------------------------------- site folder

SIZE = 8
IDS = ["001", "002", "003", "004", "005", "006"]
LINK = "->"  # a file whose content starts with this becomes a symbolic link


def _png(arr: np.ndarray, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _dicom(arr: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = arr.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def valid_site() -> dict[str, bytes]:
    """A tiny site with every modality and every image format (relative path -> bytes)."""
    rng = np.random.default_rng(0)
    img = (rng.random((SIZE, SIZE)) * 255).astype(np.uint8)
    spec = (b'name = "fuzz-site"\n[task]\nlabel = "label"\nclasses = [0, 1]\n'
            b"[modalities]\nrecords = true\nimages = true\ngenomics = true\n"
            b'[images]\nsize = [8, 8]\n[records]\ncategorical = ["sex"]\n')
    rows = ["patient_id,label,age,sex,bmi"] + [
        f"{pid},{i % 2},{40 + i},{'MF'[i % 2]},{20.5 + i}" for i, pid in enumerate(IDS)]
    rows[3] = "003,0,,NA,22.5"  # missing values are normal
    genes = ["patient_id,g1,g2,g3"] + [f"{pid},{i * 0.5},{-i},1e-3" for i, pid in
                                       enumerate(IDS[:5])]
    return {"site.toml": spec, "records.csv": "\n".join(rows).encode() + b"\n",
            "genomics.csv": "\r\n".join(genes).encode(),
            "images/001.png": _png(img), "images/002.npy": _npy(img.astype(np.float32)),
            "images/003.dcm": _dicom(img), "images/004.npy": _npy(img[None].astype(np.int16))}


VALID = valid_site()
PNG_MODES = [_png(np.full((SIZE, SIZE), 7, np.uint8), mode)
             for mode in ("RGB", "RGBA", "P", "LA", "I;16", "1")]
CELLS = st.one_of(TEXT, st.sampled_from(IDS), st.sampled_from(["0", "1", "2", "1.0", "0.0"]),
                  st.floats().map(repr), st.integers().map(str), st.just("x" * 200_000),
                  st.just('"unterminated'), st.just("a,b"), st.just('"q""q"'))


def _csv_edit(draw: st.DrawFn, data: bytes) -> bytes:
    lines = data.decode("utf-8", "replace").splitlines()
    what = draw(st.sampled_from(["cell", "cell", "drop-column", "drop-line", "dup-line",
                                 "add-column", "header", "crlf", "blank-lines"]))
    grid = [line.split(",") for line in lines] or [[""]]
    r = draw(st.integers(0, len(grid) - 1))
    c = draw(st.integers(0, max(len(grid[r]) - 1, 0)))
    if what == "cell" and grid[r]:
        grid[r][c] = draw(CELLS)
    elif what == "drop-column":
        grid = [row[:c] + row[c + 1:] for row in grid]
    elif what == "drop-line":
        del grid[r]
    elif what == "dup-line":
        grid.insert(r, list(grid[r]))
    elif what == "add-column":
        grid = [[*row, draw(CELLS)] for row in grid]
    elif what == "header":
        grid[0] = [draw(TEXT) for _ in grid[0]]
    sep = "\r\n" if what == "crlf" else "\n"
    text = sep.join(",".join(row) for row in grid)
    if what == "blank-lines":
        text = text.replace("\n", "\n\n", 1)
    return text.encode("utf-8", "surrogatepass")


def _toml_edit(draw: st.DrawFn, data: bytes) -> bytes:
    tree = tomllib.loads(data.decode())
    paths = [("name",), ("task",), ("task", "label"), ("task", "classes"), ("modalities",),
             ("modalities", "images"), ("modalities", "records"), ("modalities", "genomics"),
             ("images",), ("images", "size"), ("records",), ("records", "categorical"),
             ("records", "numeric"), ("synthetic",), ("description",), ("extra",)]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = tree
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if draw(st.booleans()) and path[-1] in node:
            del node[path[-1]]
        else:
            node[path[-1]] = draw(st.one_of(VALUES, st.lists(st.integers(0, 5000), max_size=3),
                                            st.lists(TEXT, max_size=3), TEXT))
    flat: list[tuple[str, Any]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat.append((f"{prefix}{key}", value))
    walk(tree, "")
    return toml_document(flat).encode("utf-8", "surrogatepass")


def _image_edit(draw: st.DrawFn, files: dict[str, bytes]) -> None:
    names = sorted(f for f in files if f.startswith("images/"))
    what = draw(st.sampled_from(["bytes", "cut", "shape", "dtype", "rename", "delete",
                                 "rgb", "huge-header", "link-out", "dir", "other-ext",
                                 "duplicate"]))
    name = draw(st.sampled_from(names)) if names else "images/001.png"
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if what == "bytes":
        files[name] = draw(st.binary(max_size=200))
    elif what == "cut" and name in files:
        files[name] = files[name][:draw(st.integers(0, len(files[name])))]
    elif what == "shape":
        shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
        files[f"images/{stem}.npy"] = _npy(np.zeros(shape, np.float32))
        files.pop(name, None) if not name.endswith(".npy") else None
    elif what == "dtype":
        arr = np.zeros((SIZE, SIZE), draw(st.sampled_from(
            [np.complex64, np.bool_, np.float16, np.uint64, "U3", "V4"])))
        files.pop(name, None)
        files[f"images/{stem}.npy"] = _npy(arr)
        if draw(st.booleans()):
            files[f"images/{stem}.npy"] = _npy(np.full((SIZE, SIZE), np.inf, np.float32))
    elif what == "rename":
        files[f"images/{draw(TEXT)}.png"] = files.pop(name, b"")
    elif what == "delete":
        files.pop(name, None)
    elif what == "rgb":
        files[name] = draw(st.sampled_from(PNG_MODES))
    elif what == "huge-header":
        files[f"images/{stem}.npy"] = (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order':"
                                       b" False, 'shape': (100000, 100000), }".ljust(117)
                                       + b"\n" + b"\x00" * 64)
    elif what == "link-out":
        files[name] = (LINK + draw(st.sampled_from(["../../outside.png", "/etc/hostname",
                                                    "missing.png", "."]))).encode()
    elif what == "dir":
        files[f"images/{stem}.png/inner"] = b""
    elif what == "other-ext":
        files[f"images/{stem}.txt"] = b"hello"
    elif what == "duplicate":
        files[f"images/{stem}.npy" if not name.endswith(".npy") else f"images/{stem}.png"] = (
            files.get(name, b""))


@st.composite
def mutated_site(draw: st.DrawFn) -> dict[str, bytes]:
    files = dict(VALID)
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from(["site.toml", "records.csv", "genomics.csv", "images",
                                       "bytes", "delete", "parquet", "images-dir"]))
        if target in ("site.toml",) and draw(st.booleans()):
            try:
                files["site.toml"] = _toml_edit(draw, files.get("site.toml", b""))
                continue
            except (ValueError, UnicodeDecodeError):  # TOMLDecodeError is a ValueError
                pass  # already mangled: mangle further below
        if target in ("records.csv", "genomics.csv") and target in files and draw(st.booleans()):
            files[target] = _csv_edit(draw, files[target])
        elif target == "images":
            _image_edit(draw, files)
        elif target == "delete":
            files.pop(draw(st.sampled_from(sorted(files))), None)
        elif target == "parquet":
            files["genomics.parquet"] = draw(st.binary(max_size=64))
        elif target == "images-dir":
            for name in [f for f in files if f.startswith("images/")]:
                del files[name]
            files["images"] = draw(st.sampled_from([b"not a folder", LINK.encode() + b".."]))
        else:
            name = draw(st.sampled_from(["site.toml", "records.csv", "genomics.csv"]))
            files[name] = mangle(draw, files.get(name, b"").decode("utf-8", "replace"))
    return files


def materialize(files: dict[str, bytes], folder: Path) -> None:
    """Write the files; names the file system cannot hold (too long, NUL, escaping the
    folder) are left out, as no real site folder could contain them either."""
    folder.mkdir(parents=True)
    for name, content in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute() or "\x00" in name:
            continue
        try:
            if any(parent.exists() and not parent.is_dir() for parent in path.parents):
                continue  # "images" became a file: its entries have nowhere to go
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if content.startswith(LINK.encode()):
                path.symlink_to(content[len(LINK):].decode("utf-8", "replace"))
            else:
                path.write_bytes(content)
        except (OSError, UnicodeEncodeError):
            continue


def check_site(site: SiteData) -> None:
    """Invariants of a site the reader accepted: aligned, typed, finite where present."""
    n = len(site.ids)
    assert n > 0 and len(set(site.ids)) == n
    assert all("/" not in i and "\\" not in i and ".." not in i for i in site.ids)
    assert site.labels.shape == (n,) and site.labels.min() >= 0
    assert site.labels.max() < len(site.spec.classes)
    assert site.numeric.shape == (n, len(site.numeric_cols))
    assert not np.isinf(site.numeric).any()
    assert all(len(col) == n for col in site.categorical)
    assert (site.images is None) == (not site.spec.has("images"))
    if site.images is not None:
        assert site.images.shape[:2] == (n, 1) and np.isfinite(site.images).all()
    if site.genomics is not None:
        assert site.genomics.shape == (n, len(site.genes))
        assert not np.isinf(site.genomics).any()


@FUZZ
@given(files=mutated_site(), also_load=st.integers(0, 3))
def test_fuzz_site_folder_reader(scratch: Path, files: dict[str, bytes],
                                 also_load: int) -> None:
    folder = scratch / "case" / "site"
    shutil.rmtree(folder.parent, ignore_errors=True)
    materialize(files, folder)
    try:
        result = read_site(folder)
    except Exception as exc:  # read_site promises never to raise for bad data
        pytest.fail(f"read_site raised {type(exc).__name__}: {exc!r}")
    for line in result.problems + result.warnings:
        assert isinstance(line, str) and line.strip() and len(line.splitlines()) == 1, line
    if result.site is not None:
        assert not result.problems
        check_site(result.site)
    if also_load:  # load_site reads the folder again: only for a quarter of the cases
        return
    try:
        loaded = load_site(folder)
    except Exception as exc:
        one_line(exc)
        assert result.site is None
        return
    assert result.site is not None and loaded.ids == result.site.ids


def test_the_valid_site_is_valid(scratch: Path) -> None:
    """The fuzzer's seed must load cleanly, or every case would test only rejections."""
    folder = scratch / "seed" / "site"
    materialize(dict(VALID), folder)
    site = load_site(folder)
    assert len(site) == 6 and int(site.image_mask.sum()) == 4
    assert int(site.genomics_mask.sum()) == 5


# --------------------------------------------------------------------------- regressions
# Each of these was found by the fuzzers above; kept as named cases so that a fix that
# regresses fails here directly, whatever the random search happens to generate.


@pytest.mark.parametrize("item", [
    "seed=" + "9" * 5000,  # tomllib raises a bare ValueError (int() digit limit)
    "train.lr=" + "9" * 400,  # float() of a huge int overflows
    "out=\udcff",  # undecodable argv bytes: a lone surrogate, unwritable as TOML
])
def test_config_overrides_found_by_fuzzing(item: str) -> None:
    with pytest.raises(MmfedError) as info:
        RunConfig.load(None, overrides=[item])
    one_line(info.value)


@pytest.mark.parametrize("key", ["data.\n", "privacy.site.x.epsilon\n", "a\u2028b"])
def test_config_keys_with_line_breaks_are_one_line_errors(key: str) -> None:
    with pytest.raises(MmfedError) as info:
        RunConfig().set(key, 1.0)
    one_line(info.value)


def test_config_file_with_a_huge_integer_is_a_config_error(scratch: Path) -> None:
    path = scratch / "huge.toml"
    path.write_text("seed = " + "9" * 5000 + "\n")
    with pytest.raises(MmfedError) as info:
        RunConfig.load(path)
    one_line(info.value)


def test_text_with_del_survives_config_toml() -> None:
    cfg = RunConfig({"out": "runs/a\x7fb"})
    check_config(cfg, round_trip=True)


@pytest.mark.parametrize(("text", "needle"), [
    ('"\\u001e" = 1\n', "unknown key(s) '\\x1e'"),
    ("[privacy]\nepsilon = " + "9" * 400 + "\n", "out of range"),
    ("[privacy]\nepsilon = " + "9" * 5000 + "\n", "not valid TOML"),
    ('x = 1\n[privacy]\nepsilon = 1.0\n', "unknown key(s) 'x'"),
    ("[privacy]\nepsilon = 2000.0\n", "'epsilon': must be between 0.001 and 1000"),
    ('[privacy]\nepsilon = "8"\n', "'epsilon': expected float"),
    ('[privacy]\nsecure_aggregation = "never"\n', "must be one of required, optional"),
    ("[privacy]\nmin_cohort = 0\n", "'min_cohort': must be between 1 and"),
])
def test_policy_schema_errors_are_one_line(scratch: Path, text: str, needle: str) -> None:
    path = scratch / "policy-case.toml"
    path.write_text(text)
    with pytest.raises(MmfedError) as info:
        load_policy(path)
    one_line(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("records.csv", b"patient_id,label," + b"x" * 200_000 + b"\n001,0,1\n",
     "malformed CSV header"),
    ("records.csv", b'patient_id,label,"a\nb"\n001,0,x\n002,1,1\n003,0,2\n004,1,3\n'
     b"005,0,4\n006,1,5\n", "'a\\nb'"),
    ("genomics.csv", b"patient_id,g1\n001,1E39\n", "non-numeric expression value"),
    ("records.csv", b"patient_id,label,age\n001,0,1E39\n002,1,1\n003,0,2\n004,1,3\n"
     b"005,0,4\n006,1,5\n", "non-numeric value in numeric column 'age'"),
    ("site.toml", b'name = "x"\nyear = ' + b"9" * 5000 + b"\n", "not valid TOML"),
])
def test_site_files_found_by_fuzzing(scratch: Path, name: str, content: bytes,
                                     needle: str) -> None:
    folder = scratch / "regression" / "site"
    shutil.rmtree(folder.parent, ignore_errors=True)
    materialize({**VALID, name: content}, folder)
    result = read_site(folder)
    for line in result.problems + result.warnings:
        assert len(line.splitlines()) == 1, line
    assert any(needle in p for p in result.problems), result.problems
    with pytest.raises(MmfedError) as info:
        load_site(folder)
    one_line(info.value)
