"""The pixel layer of ``mmfed data import``: one hospital file in, one float32 image out.

A PACS export is a heap of files with meaningless names, most of which are not the image
a model should see: structured reports, RT plans, scouts, truncated transfers, notes. This
module answers three questions for the importer, each as a pure function so the rules can
be tested against real files and stated in the documentation:

* ``probe``: is this file a usable image, and whose? (cheap: headers only)
* ``choose``: which of a patient's images is *the* image? (deterministic, order-free)
* ``decode``: what are its pixels, as a float32 (H, W) array of the site's size?

Every step that changes pixel values is recorded as a short text in ``Decoded.transforms``
so an operator can see what was done to the data. None of those texts, nor any
``SkipFile`` reason, may contain header values that identify people (names, dates, UIDs,
free text): they end up in import reports that leave the hospital's imaging system. Only
fixed vocabulary is allowed there (transfer-syntax, photometric, modality and SOP class
names, counts and sizes).

pydicom and Pillow emit warnings whose text can quote header values; both are silenced
inside ``probe`` and ``decode`` (``warnings.catch_warnings``, which is process-global, so
call these from one thread at a time or accept that other threads' warnings are muted).
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset

# The public names are pydicom.pixels.<name>; imported from the defining modules because
# pydicom.pixels does not re-export them explicitly (mypy --strict).
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "CATEGORY_BAD_PIXELS",
    "CATEGORY_CORRUPT",
    "CATEGORY_NO_PATIENT",
    "CATEGORY_NO_PIXELS",
    "CATEGORY_UNDECODABLE",
    "CATEGORY_UNKNOWN",
    "KINDS",
    "Candidate",
    "Decoded",
    "SkipFile",
    "choose",
    "decode",
    "equal_channels",
    "luminance",
    "probe",
]

CATEGORY_UNKNOWN = "not an image or DICOM file"
CATEGORY_CORRUPT = "truncated or corrupt file"
CATEGORY_NO_PIXELS = "DICOM without pixel data"
CATEGORY_NO_PATIENT = "DICOM without a PatientID"
CATEGORY_UNDECODABLE = "pixel data cannot be decoded"
CATEGORY_BAD_PIXELS = "unusable pixel values"

KINDS = ("dicom", "png", "jpeg", "tiff", "npy")

# ITU-R BT.601 luma weights: the standard the JPEG/DICOM YCbCr transforms are built on, so
# a YBR image converted to RGB and back to luminance gets its own Y channel back.
_BT601 = (0.299, 0.587, 0.114)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_NPY_MAGIC = b"\x93NUMPY"
_PIXEL_TAGS = {
    (0x7FE0, 0x0010): "PixelData",
    (0x7FE0, 0x0008): "FloatPixelData",
    (0x7FE0, 0x0009): "DoubleFloatPixelData",
}
_PIXEL_KEYWORDS = tuple(_PIXEL_TAGS.values())
_PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# A Code String (CS) value: what Modality and PhotometricInterpretation may legally hold.
# Anything else in those elements is free text and must not be echoed into a report.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_GRAY_MODES = frozenset({"1", "L", "I", "F"})
_MIN_SIDE = 2
# Elements every real DICOM object has at least one of; a forced parse of junk has none.
_CONTENT_KEYWORDS = ("SOPClassUID", "PatientID", "Modality", "Rows", "StudyInstanceUID",
                     "SeriesInstanceUID", "SOPInstanceUID")


class SkipFile(Exception):
    """A file that is not a usable image; str(exc) is a short one-line reason.

    ``category`` is one of the ``CATEGORY_*`` constants so the importer can count skips
    by reason; ``detail`` narrows it down using fixed vocabulary only (never header text
    that could identify a person).
    """

    def __init__(self, category: str, detail: str = "") -> None:
        self.category = category
        self.detail = " ".join(detail.split())
        super().__init__(f"{category} ({self.detail})" if self.detail else category)


@dataclass(frozen=True)
class Candidate:
    """What ``probe`` learned from a file's header: enough to choose without decoding."""

    path: Path
    kind: str  # "dicom" | "png" | "jpeg" | "tiff" | "npy"
    patient_id: str  # DICOM PatientID, whitespace-stripped; else the file stem
    series_uid: str  # SeriesInstanceUID or "" (in memory only, never written anywhere)
    series_number: int | None
    instance_number: int | None
    frames: int  # NumberOfFrames (1 if absent); pages for TIFF; slices for 3-D npy
    rows: int
    cols: int


@dataclass
class Decoded:
    """One image ready to store, with the record of what was done to get it."""

    pixels: np.ndarray  # float32 (H, W) of the requested size, finite
    transforms: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # How the source stored its pixels (a DICOM transfer syntax name, or the file kind):
    # what an operator needs to see which decoders their archive relies on.
    encoding: str = ""


@contextmanager
def _quiet() -> Iterator[None]:
    """Mute library warnings: their text may quote header values (names, UIDs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------
# Colour helpers (also used by `mmfed data check`)
# ---------------------------------------------------------------------------------------

def _check_colour_shape(arr: np.ndarray) -> None:
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected a (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB(A) image: models take one channel, and luma is what a
    grayscale rendering of a colour image shows a reader. Alpha is ignored."""
    _check_colour_shape(rgb)
    channels = rgb[..., :3].astype(np.float64)
    luma = channels[..., 0] * _BT601[0] + channels[..., 1] * _BT601[1]
    luma += channels[..., 2] * _BT601[2]
    return luma.astype(np.float32)


def equal_channels(arr: np.ndarray) -> np.ndarray | None:
    """The single channel of a colour-encoded grayscale image, or None for real colour.

    Many tools save grayscale as RGB; such an image must pass unchanged (and without a
    colour warning), since BT.601 weights sum to 1 only up to rounding. Alpha is ignored.
    Raises ValueError for arrays that are not (H, W, 3|4).
    """
    _check_colour_shape(arr)
    first = arr[..., 0]
    if np.array_equal(first, arr[..., 1]) and np.array_equal(first, arr[..., 2]):
        return np.array(first)
    return None


def _to_gray(colour: np.ndarray, label: str, out: Decoded) -> np.ndarray:
    """The shared colour rule for DICOM and ordinary image files."""
    single = equal_channels(colour)
    if single is not None:
        out.transforms.append("equal colour channels -> one channel")
        return single.astype(np.float64)
    out.transforms.append("luminance 0.299 R + 0.587 G + 0.114 B (BT.601)")
    out.warnings.append(f"colour image ({label}) converted to luminance (BT.601)")
    return luminance(colour).astype(np.float64)


# ---------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------

def probe(path: Path) -> Candidate:
    """Identify a file by its magic bytes and read just enough to choose among images.

    Extensions lie in PACS exports (IM000123 has none; a ``.dcm`` may be a PDF), so only
    content decides. Raises nothing but ``SkipFile``: pydicom and Pillow raise many
    exception types on hostile input, and one bad file must not stop an import.
    """
    path = Path(path)
    try:
        with _quiet():
            return _probe(path)
    except SkipFile:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # the boundary: anything unforeseen is a bad file
        raise SkipFile(CATEGORY_CORRUPT, f"unreadable ({type(exc).__name__})") from None


def _probe(path: Path) -> Candidate:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise SkipFile(CATEGORY_UNKNOWN, f"cannot be opened ({type(exc).__name__})") from None
    if not head:
        raise SkipFile(CATEGORY_UNKNOWN, "empty file")
    if head[128:132] == b"DICM":
        # First: the 128-byte preamble is free-form and often holds a TIFF header (dual
        # DICOM/TIFF files; pydicom's own test files do this), so DICM must win.
        return _probe_dicom(path, file_format=True)
    if head.startswith(_PNG_MAGIC):
        return _probe_pillow(path, "png")
    if head.startswith(_JPEG_MAGIC):
        return _probe_pillow(path, "jpeg")
    if head[:4] in _TIFF_MAGICS:
        return _probe_pillow(path, "tiff")
    if head.startswith(_NPY_MAGIC):
        return _probe_npy(path)
    if _may_be_raw_dicom(head):
        return _probe_dicom(path, file_format=False)
    raise SkipFile(CATEGORY_UNKNOWN)


def _may_be_raw_dicom(head: bytes) -> bool:
    """Whether a file could be a DICOM data set without preamble and file meta.

    Such a file starts with its first element's tag: an even (standard) group from the
    low groups every object has (file meta 0002, identification 0008, patient 0010...).
    Screening on that keeps pydicom's forced parse away from text and archives.
    """
    if len(head) < 8:
        return False
    for order in "<>":
        group = struct.unpack(f"{order}H", head[:2])[0]
        if group % 2 == 0 and group <= 0x0028:
            return True
    return False


def _get(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None when absent or not parseable (hostile headers)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _as_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return int(number) if number.is_integer() else None


def _code(value: Any) -> str:
    """A Code String value safe to show, or "" when the element holds anything else."""
    if value is None:
        return ""
    text = str(value).strip()
    return text if _CODE_STRING.fullmatch(text) else ""


def _uid_name(value: Any) -> str:
    """The registered name of a standard UID (e.g. "CT Image Storage"), else "".

    An unregistered UID's name is the UID itself, which must never reach a report.
    """
    if not value:
        return ""
    try:
        uid = UID(str(value).strip())
        name = uid.name
    except Exception:
        return ""
    return "" if name == str(uid) else name


def _ts_label(ts: UID) -> str:
    return _uid_name(ts) or "unrecognised transfer syntax"


def _frames_of(ds: Dataset) -> int:
    frames = _as_int(_get(ds, "NumberOfFrames"))
    return frames if frames is not None and frames > 0 else 1


def _patient_id(ds: Dataset) -> str:
    value = _get(ds, "PatientID")
    if value is None:
        return ""
    if isinstance(value, str | bytes):
        text = value.decode("latin-1") if isinstance(value, bytes) else value
    else:  # a backslash in an LO value makes pydicom split it into a MultiValue
        text = "\\".join(str(v) for v in value)
    return text.strip().strip("\x00").strip()


def _pixel_element_at(f: BinaryIO, size: int, ds: Dataset) -> tuple[str, int] | None:
    """The pixel element (keyword, value length) at the file position, if there is one.

    ``dcmread(stop_before_pixels=True)`` stops *at* the pixel element's tag without
    reading its value, so a look at the next bytes tells whether pixel data exists and
    whether the file is long enough to hold it, without reading megabytes of frames.
    Length -1 means the file ends before the value does. The VR field is sniffed rather
    than trusted to the transfer syntax: some writers encode implicit VR under an
    explicit syntax, and pydicom quietly reads those too.
    """
    start = f.tell()
    header = f.read(12)
    if len(header) < 8:
        return None
    _, little = ds.original_encoding
    order = ">" if little is False else "<"
    keyword = _PIXEL_TAGS.get(struct.unpack(f"{order}HH", header[:4]))
    if keyword is None:
        return None
    if header[4:6] in _PIXEL_VRS:
        if len(header) < 12:
            return keyword, -1
        length, used = struct.unpack(f"{order}I", header[8:12])[0], 12
    else:
        length, used = struct.unpack(f"{order}I", header[4:8])[0], 8
    if length != _UNDEFINED_LENGTH and start + used + length > size:
        return keyword, -1
    return keyword, length


def _sop_class_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return _uid_name(_get(ds, "SOPClassUID")) or _uid_name(
        meta.get("MediaStorageSOPClassUID") if meta is not None else None)


def _describe_object(ds: Dataset) -> str:
    """E.g. "SR, Comprehensive SR Storage": fixed vocabulary that says what was skipped."""
    parts = [_code(_get(ds, "Modality")), _sop_class_name(ds)]
    return ", ".join(p for p in parts if p)


def _probe_dicom(path: Path, file_format: bool) -> Candidate:
    size = path.stat().st_size
    # Without the DICM marker, a file pydicom cannot parse was most likely never DICOM.
    unreadable = CATEGORY_CORRUPT if file_format else CATEGORY_UNKNOWN
    with path.open("rb") as f:
        try:
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        except Exception:
            raise SkipFile(unreadable, "DICOM header cannot be read") from None
        if file_format and len(ds) == 0:
            # The DICM marker and file meta are there, the data set is not: cut off.
            raise SkipFile(CATEGORY_CORRUPT, "DICOM file ends after its file meta")
        if not file_format and not any(_get(ds, k) is not None for k in _CONTENT_KEYWORDS):
            # A forced parse of a file that is not DICOM yields an empty or junk data set.
            raise SkipFile(CATEGORY_UNKNOWN, "no DICOM content")
        ts = _transfer_syntax(ds)
        if ts == DeflatedExplicitVRLittleEndian:
            # The file position is inside the inflated stream, not the file: look at the
            # whole (small, since deflate is only used for small objects) data set instead.
            full = pydicom.dcmread(path, force=True)
            keyword = next((k for k in _PIXEL_KEYWORDS if k in full), None)
            pixel: tuple[str, int] | None = (keyword, 1) if keyword else None
        else:
            pixel = _pixel_element_at(f, size, ds)
    if pixel is not None and pixel[1] < 0:
        raise SkipFile(CATEGORY_CORRUPT, "pixel data truncated")
    what = _describe_object(ds)
    if pixel is None:
        if _get(ds, "Rows") is not None or "Image Storage" in _sop_class_name(ds):
            # An image object whose header ends where pixels should start was cut off.
            raise SkipFile(CATEGORY_CORRUPT, "image object ends before its pixel data")
        raise SkipFile(CATEGORY_NO_PIXELS, what or "no modality")
    if pixel[1] == 0:
        raise SkipFile(CATEGORY_NO_PIXELS, f"empty pixel data{', ' + what if what else ''}")
    patient = _patient_id(ds)
    if not patient:
        raise SkipFile(CATEGORY_NO_PATIENT, what)
    rows, cols = _as_int(_get(ds, "Rows")), _as_int(_get(ds, "Columns"))
    if rows is None or cols is None:
        raise SkipFile(CATEGORY_CORRUPT, "pixel data without Rows/Columns")
    if rows < _MIN_SIDE or cols < _MIN_SIDE:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"image {rows}x{cols} is smaller than 2x2")
    series_uid = _get(ds, "SeriesInstanceUID")
    return Candidate(
        path=path, kind="dicom", patient_id=patient,
        series_uid=str(series_uid).strip() if series_uid else "",
        series_number=_as_int(_get(ds, "SeriesNumber")),
        instance_number=_as_int(_get(ds, "InstanceNumber")),
        frames=_frames_of(ds), rows=rows, cols=cols,
    )


def _stem_patient(path: Path) -> str:
    patient = path.stem.strip()
    if not patient:
        raise SkipFile(CATEGORY_UNKNOWN, "file name gives no patient id")
    return patient


def _probe_pillow(path: Path, kind: str) -> Candidate:
    patient = _stem_patient(path)
    try:
        with Image.open(path) as img:
            cols, rows = img.size
            frames = int(getattr(img, "n_frames", 1)) if kind == "tiff" else 1
    except Image.DecompressionBombError:
        raise SkipFile(CATEGORY_BAD_PIXELS, "image too large (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise SkipFile(CATEGORY_CORRUPT, f"{kind.upper()} header cannot be read") from None
    if rows < _MIN_SIDE or cols < _MIN_SIDE:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"image {rows}x{cols} is smaller than 2x2")
    return Candidate(path=path, kind=kind, patient_id=patient, series_uid="",
                     series_number=None, instance_number=None, frames=max(frames, 1),
                     rows=rows, cols=cols)


def _npy_layout(shape: tuple[int, ...]) -> tuple[str, int, int, int]:
    """How a saved array holds an image: (layout, frames, rows, cols).

    2-D is one image; 3-D with 3 or 4 in the last axis is colour (H, W, C), with 1 in the
    last axis a single channel (H, W, 1); any other 3-D array is a stack of slices
    (k, H, W). The (3, H, W) / (H, W, 3) ambiguity is settled in favour of colour.
    """
    if any(n == 0 for n in shape):
        raise SkipFile(CATEGORY_BAD_PIXELS, f"empty array {shape}")
    if len(shape) == 2:
        return "plain", 1, shape[0], shape[1]
    if len(shape) == 3:
        if shape[-1] in (3, 4):
            return "colour", 1, shape[0], shape[1]
        if shape[-1] == 1:
            return "channel", 1, shape[0], shape[1]
        return "slices", shape[0], shape[1], shape[2]
    raise SkipFile(CATEGORY_BAD_PIXELS, f"array with {len(shape)} dimensions")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:  # 2.0 and 3.0 share the layout; 3.0 only allows UTF-8 field names
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception:
            raise SkipFile(CATEGORY_CORRUPT, "NPY header cannot be read") from None
        data_start = f.tell()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"NPY array of dtype kind {dtype.kind!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_start + expected > size:
        raise SkipFile(CATEGORY_CORRUPT, "NPY data truncated")
    return tuple(int(n) for n in shape), dtype


def _probe_npy(path: Path) -> Candidate:
    patient = _stem_patient(path)
    shape, _ = _npy_header(path)
    _, frames, rows, cols = _npy_layout(shape)
    if rows < _MIN_SIDE or cols < _MIN_SIDE:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"image {rows}x{cols} is smaller than 2x2")
    return Candidate(path=path, kind="npy", patient_id=patient, series_uid="",
                     series_number=None, instance_number=None, frames=frames,
                     rows=rows, cols=cols)


# ---------------------------------------------------------------------------------------
# choose
# ---------------------------------------------------------------------------------------

def choose(candidates: list[Candidate], root: Path) -> tuple[Candidate, str]:
    """One image per patient, by a rule an operator can predict and a test can check.

    1. DICOM beats other files: the header names the patient, a file name may be wrong.
    2. Among DICOM, the series with the most images, frames counted (the main
       acquisition; a scout or localizer has few, and one enhanced multi-frame object is
       a whole volume); ties: lowest SeriesNumber (None last), then smallest path.
    3. Within it, instances sorted by InstanceNumber (None last) then path; the middle
       one, index (n-1)//2: a volume's middle slice shows the most anatomy.
    4. Among other files: the smallest path.
    Paths compare as POSIX text relative to ``root``, so the result does not depend on
    the order of ``candidates`` nor on where the export was mounted. The description
    holds counts only (paths can contain patient names).
    """
    if not candidates:
        raise ValueError("choose() needs at least one candidate")

    def rel(c: Candidate) -> str:
        try:
            return c.path.relative_to(root).as_posix()
        except ValueError:
            return c.path.as_posix()

    dicom = [c for c in candidates if c.kind == "dicom"]
    others = sorted((c for c in candidates if c.kind != "dicom"), key=rel)
    if not dicom:
        if len(others) == 1:
            return others[0], "only file"
        return others[0], f"first of {len(others)} non-DICOM files by path"

    series: dict[str, list[Candidate]] = {}
    for c in dicom:
        series.setdefault(c.series_uid, []).append(c)

    def series_number(members: list[Candidate]) -> int | None:
        numbers = [m.series_number for m in members if m.series_number is not None]
        return min(numbers) if numbers else None

    def series_key(members: list[Candidate]) -> tuple[int, bool, int, str]:
        number = series_number(members)
        return (-sum(m.frames for m in members), number is None,
                number if number is not None else 0,
                min(rel(m) for m in members))

    ranked = sorted(series.values(), key=series_key)
    best = ranked[0]
    instances = sorted(best, key=lambda c: (c.instance_number is None,
                                            c.instance_number or 0, rel(c)))
    index = (len(instances) - 1) // 2
    chosen = instances[index]

    parts: list[str] = []
    if others:
        parts.append(f"DICOM preferred over {len(others)} other file(s)")
    if len(ranked) > 1:
        def images(members: list[Candidate]) -> int:
            return sum(m.frames for m in members)

        text = f"series with most images ({images(best)} of {len(ranked)} series)"
        runner_up = ranked[1]
        if images(runner_up) == images(best):
            if series_number(runner_up) != series_number(best):
                text += ", tie broken by lowest series number"
            else:
                text += ", tie broken by path"
        parts.append(text)
    if len(instances) > 1:
        parts.append(f"middle instance {index + 1} of {len(instances)}")
    if not parts:
        return chosen, "only file"
    return chosen, ", ".join(parts)


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------

def decode(candidate: Candidate, size: tuple[int, int]) -> Decoded:
    """The candidate's pixels as float32 (H, W) = ``size``, following the documented rules.

    Raises ``SkipFile`` (CORRUPT, UNDECODABLE or BAD_PIXELS) when the file cannot give a
    usable image, and nothing else for bad files; ValueError for a bad ``size``.
    """
    height, width = _check_size(size)
    if candidate.kind not in KINDS:
        raise ValueError(f"unknown candidate kind {candidate.kind!r}")
    out = Decoded(pixels=np.zeros((0, 0), np.float32))
    try:
        with _quiet():
            if candidate.kind == "dicom":
                image = _decode_dicom(candidate.path, out)
            elif candidate.kind == "npy":
                image = _decode_npy(candidate.path, out)
            else:
                image = _decode_pillow(candidate.path, candidate.kind, out)
            out.pixels = _fit(image, height, width, out)
    except (SkipFile, MemoryError):
        raise
    except OSError as exc:
        raise SkipFile(CATEGORY_CORRUPT, f"cannot be read ({type(exc).__name__})") from None
    except Exception as exc:  # the boundary: anything unforeseen is a bad file
        raise SkipFile(CATEGORY_UNDECODABLE, f"unexpected {type(exc).__name__}") from None
    return out


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (len(size) != 2 or not all(isinstance(n, int | np.integer) for n in size)
            or min(size) < 1):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _transfer_syntax(ds: Dataset) -> UID:
    """The data set's transfer syntax, inferred from its encoding when there is no meta.

    Files without file meta ("no meta" exports) still decode: pydicom recorded how it
    parsed them, and the native syntaxes are fully described by VR and byte order.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian


def _decode_dicom(path: Path, out: Decoded) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        raise SkipFile(CATEGORY_CORRUPT, "DICOM file cannot be read") from None
    ts = _transfer_syntax(ds)
    out.encoding = _ts_label(ts)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = ts  # what the decoders look up
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise SkipFile(CATEGORY_NO_PIXELS, _describe_object(ds))
    try:
        decoder = get_decoder(ts)
    except Exception:
        raise SkipFile(CATEGORY_UNDECODABLE, _ts_label(ts)) from None

    frames = _frames_of(ds)
    index = (frames - 1) // 2
    try:
        # Only the middle frame is decoded: a US cine loop can hold hundreds of frames.
        arr, props = decoder.as_array(ds, index=index, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as exc:
        if "less than expected" in str(exc):
            raise SkipFile(CATEGORY_CORRUPT, "pixel data truncated") from None
        raise SkipFile(CATEGORY_UNDECODABLE, _ts_label(ts)) from None
    if frames > 1:
        out.transforms.append(f"frame {index + 1} of {frames} (middle)")

    photometric = _code(_get(ds, "PhotometricInterpretation")) or "MONOCHROME2"
    decoded_as = str(props.get("photometric_interpretation", photometric))
    if arr.ndim == 3:
        return _dicom_colour(arr, photometric, decoded_as, out)
    if arr.ndim != 2:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"decoded frame has {arr.ndim} dimensions")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        out.transforms.append("palette colour lookup table applied")
        return _to_gray(rgb, photometric, out)
    values = _modality_lut(arr, ds, index, out)
    if photometric == "MONOCHROME1":
        _require_finite(values)
        values = (values.min() + values.max()) - values
        out.transforms.append("MONOCHROME1 inverted")
    return values


def _dicom_colour(arr: np.ndarray, photometric: str, decoded_as: str,
                  out: Decoded) -> np.ndarray:
    """Colour frames to RGB, then to one channel by the shared colour rule.

    pydicom 3 already returns RGB for YBR_FULL/YBR_FULL_422 (``as_rgb``), and the JPEG
    2000 plugins return RGB for YBR_ICT/YBR_RCT; the decoder's reported photometric
    interpretation says which happened, so nothing is converted twice.
    """
    if arr.shape[-1] not in (3, 4):
        raise SkipFile(CATEGORY_BAD_PIXELS, f"{arr.shape[-1]} samples per pixel")
    if decoded_as in ("YBR_FULL", "YBR_FULL_422"):
        if arr.dtype != np.uint8:
            raise SkipFile(CATEGORY_UNDECODABLE, f"{decoded_as} with more than 8 bits")
        arr = convert_color_space(arr, decoded_as, "RGB")
        decoded_as = "RGB"
    elif photometric in ("YBR_ICT", "YBR_RCT") and decoded_as == photometric:
        decoded_as = "RGB"  # every JPEG 2000 plugin pydicom uses returns RGB for these
    if decoded_as != "RGB":
        raise SkipFile(CATEGORY_UNDECODABLE, f"photometric {decoded_as or 'unknown'}")
    if photometric != "RGB":
        out.transforms.append(f"{photometric} converted to RGB")
    return _to_gray(arr, photometric, out)


def _rescale_source(ds: Dataset, index: int) -> Dataset | None:
    """Where the frame's rescale lives: the top level, or (enhanced multi-frame objects)
    the per-frame or shared Pixel Value Transformation functional group."""
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return ds
    for keyword, item in (("PerFrameFunctionalGroupsSequence", index),
                          ("SharedFunctionalGroupsSequence", 0)):
        groups = _get(ds, keyword)
        if not groups or len(groups) <= item:
            continue
        transformation = _get(groups[item], "PixelValueTransformationSequence")
        if transformation and "RescaleSlope" in transformation[0] \
                and "RescaleIntercept" in transformation[0]:
            return transformation[0]
    return None


def _modality_lut(arr: np.ndarray, ds: Dataset, index: int, out: Decoded) -> np.ndarray:
    """Stored values to modality units (e.g. Hounsfield): the scale that means the same
    at every site, unlike raw stored values which depend on the scanner's encoding."""
    if _get(ds, "ModalityLUTSequence"):
        out.transforms.append("modality LUT (lookup table)")
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    source = _rescale_source(ds, index)
    if source is not None:
        slope, intercept = float(source.RescaleSlope), float(source.RescaleIntercept)
        if slope != 1 or intercept != 0:
            out.transforms.append(f"modality LUT (slope {slope:g}, intercept {intercept:g})")
            return np.asarray(apply_modality_lut(arr, source), dtype=np.float64)
    return arr.astype(np.float64)


def _decode_pillow(path: Path, kind: str, out: Decoded) -> np.ndarray:
    out.encoding = kind.upper()
    try:
        with Image.open(path) as img:
            pages = int(getattr(img, "n_frames", 1)) if kind == "tiff" else 1
            if pages > 1:
                page = (pages - 1) // 2
                img.seek(page)
                out.transforms.append(f"page {page + 1} of {pages} (middle)")
            img.load()
            return _pillow_pixels(img, out)
    except SkipFile:
        raise
    except Image.DecompressionBombError:
        raise SkipFile(CATEGORY_BAD_PIXELS, "image too large (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if "decoder" in str(exc) and "not available" in str(exc):
            raise SkipFile(CATEGORY_UNDECODABLE, f"{kind.upper()} compression") from None
        raise SkipFile(CATEGORY_CORRUPT, f"{kind.upper()} data cannot be read") from None


def _pillow_pixels(img: Image.Image, out: Decoded) -> np.ndarray:
    mode = img.mode
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        return np.asarray(img).astype(np.float64)
    if mode in ("LA", "La"):
        out.transforms.append(f"{mode} -> L (alpha dropped)")
        return np.asarray(img.convert("L")).astype(np.float64)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        return _to_gray(np.asarray(img), mode, out)
    label = "palette" if mode in ("P", "PA") else mode
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError):
        raise SkipFile(CATEGORY_UNDECODABLE, f"image mode {mode}") from None
    out.transforms.append(f"{label} -> RGB")
    return _to_gray(np.asarray(rgb), label, out)


def _decode_npy(path: Path, out: Decoded) -> np.ndarray:
    out.encoding = "NPY"
    shape, _ = _npy_header(path)
    layout, frames, _, _ = _npy_layout(shape)
    try:
        # Memory-mapped so that only the slice we keep is read from a large stack.
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        raise SkipFile(CATEGORY_CORRUPT, "NPY data cannot be read") from None
    try:
        if layout == "slices":
            index = (frames - 1) // 2
            image = np.array(data[index], dtype=np.float64)
            if frames > 1:
                out.transforms.append(f"slice {index + 1} of {frames} (middle)")
            return image
        if layout == "channel":
            return np.array(data[..., 0], dtype=np.float64)
        if layout == "colour":
            return _to_gray(np.array(data), "array", out)
        return np.array(data, dtype=np.float64)
    finally:
        del data


def _require_finite(image: np.ndarray) -> None:
    if not np.isfinite(image).all():
        raise SkipFile(CATEGORY_BAD_PIXELS, "NaN or infinite values")


def _fit(image: np.ndarray, height: int, width: int, out: Decoded) -> np.ndarray:
    """Pad to the target aspect ratio, then resample: anatomy keeps its proportions.

    Padding uses the image's minimum (background in every monochrome convention once
    MONOCHROME1 is inverted). BOX averages when shrinking, so no detail aliases into the
    small image; BILINEAR interpolates when enlarging.
    """
    if image.ndim != 2 or image.size == 0:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"image of shape {image.shape}")
    rows, cols = image.shape
    if rows < _MIN_SIDE or cols < _MIN_SIDE:
        raise SkipFile(CATEGORY_BAD_PIXELS, f"image {rows}x{cols} is smaller than 2x2")
    _require_finite(image)
    if np.abs(image).max() > np.finfo(np.float32).max:
        raise SkipFile(CATEGORY_BAD_PIXELS, "values too large for float32")
    pixels = image.astype(np.float32)

    if rows * width < cols * height:  # too wide for the target: add rows
        new_rows, new_cols = max(rows, round(cols * height / width)), cols
    elif rows * width > cols * height:  # too tall: add columns
        new_rows, new_cols = rows, max(cols, round(rows * width / height))
    else:
        new_rows, new_cols = rows, cols
    if (new_rows, new_cols) != (rows, cols):
        top, left = (new_rows - rows) // 2, (new_cols - cols) // 2
        pixels = np.pad(pixels, ((top, new_rows - rows - top), (left, new_cols - cols - left)),
                        mode="constant", constant_values=pixels.min())
        out.transforms.append(f"padded {rows}x{cols} -> {new_rows}x{new_cols}")

    if (new_rows, new_cols) != (height, width):
        shrinking = new_rows * new_cols > height * width
        method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), method)
        pixels = np.asarray(resized, dtype=np.float32).copy()
        out.transforms.append(f"resized {new_rows}x{new_cols} -> {height}x{width}")
    _require_finite(pixels)
    return pixels
