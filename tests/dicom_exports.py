"""Realistic PACS exports built from the real DICOM objects pydicom ships, for import tests.

A hospital export is what ``mmfed data import`` must survive: meaningless file names,
patient names in folder names, several series per patient, reports and plans without
pixels, truncated transfers, stray notes. Synthesizing DICOM by hand would only test our
own idea of the format, so every object here is one of pydicom's real test files (read
from its installed package folder; ``get_testdata_file`` may try to download), re-keyed to
fresh patients and planted with PHI that an import must never echo.

Not a test module itself: ``build_export`` is imported by the pixel-layer tests and by
the importer's tests.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from mmfed.data.pixels import (
    CATEGORY_CORRUPT,
    CATEGORY_NO_PIXELS,
    CATEGORY_UNDECODABLE,
    CATEGORY_UNKNOWN,
)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
LAYOUTS = ("nested", "flat", "dicomdir-like")

# Every decodable transfer syntax the import must handle, with the file carrying it and
# the photometric interpretation it was stored in (file -> (transfer syntax, photometric)).
DECODABLE: dict[str, tuple[str, str]] = {
    "CT_small.dcm": ("Explicit VR Little Endian", "MONOCHROME2"),
    "MR_small.dcm": ("Explicit VR Little Endian", "MONOCHROME2"),
    "MR_small_implicit.dcm": ("Implicit VR Little Endian", "MONOCHROME2"),
    "MR_small_bigendian.dcm": ("Explicit VR Big Endian", "MONOCHROME2"),
    "image_dfl.dcm": ("Deflated Explicit VR Little Endian", "MONOCHROME2"),
    "MR_small_RLE.dcm": ("RLE Lossless", "MONOCHROME2"),
    "SC_rgb_jpeg_dcmtk.dcm": ("JPEG Baseline (Process 1)", "YBR_FULL"),
    "JPGExtended.dcm": ("JPEG Extended (Process 2 and 4)", "MONOCHROME2"),
    "SC_rgb_jpeg_gdcm.dcm": (
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction "
        "(Process 14 [Selection Value 1])", "RGB"),
    "MR_small_jpeg_ls_lossless.dcm": ("JPEG-LS Lossless Image Compression", "MONOCHROME2"),
    "JPEGLSNearLossless_16.dcm": (
        "JPEG-LS Lossy (Near-Lossless) Image Compression", "MONOCHROME2"),
    "MR_small_jp2klossless.dcm": ("JPEG 2000 Image Compression (Lossless Only)",
                                  "MONOCHROME2"),
    "693_J2KI.dcm": ("JPEG 2000 Image Compression", "MONOCHROME2"),
    "examples_ybr_color.dcm": ("JPEG Baseline (Process 1)", "YBR_FULL_422"),
    "examples_palette.dcm": ("Explicit VR Little Endian", "PALETTE COLOR"),
    "examples_rgb_color.dcm": ("Explicit VR Little Endian", "RGB"),
    "SC_rgb_rle_2frame.dcm": ("RLE Lossless", "RGB"),
    "ExplVR_BigEnd.dcm": ("Explicit VR Big Endian", "RGB"),
    "rtdose.dcm": ("Implicit VR Little Endian", "MONOCHROME2"),
}

CT_SLICES = 5  # the main CT series; its middle (index 2) is InstanceNumber 3
CT_OFFSETS = tuple(100 * k for k in range(1, CT_SLICES + 1))  # added to slice k's pixels
ABSENT_ID = "X999"

_LAST = ("DOE", "ROE", "SMITH", "JONES", "BAKER", "MILLER", "GARCIA", "NGUYEN", "KOWALSKI",
         "OKAFOR")
_FIRST = ("JANE", "JOHN", "MARY", "PETER", "ANNA", "OMAR", "LUCIA", "HENRIK")
_BIRTH_DATES = ("19610412", "19550923", "19780130", "19840717", "19691105", "19920228")


@dataclass
class _File:
    """One file of the export before it gets a path."""

    role: str  # what it is for the tests (see build_export)
    source: str  # the pydicom test file it came from, or "generated"
    patient: str | None
    data: bytes
    series: int = 1  # series folder number within the patient's study
    name: str = ""  # a fixed file name (PNG/TIFF named by patient id); else IMnnnnnn
    skip: list[str] = field(default_factory=list)  # acceptable skip categories


@dataclass
class _Phi:
    names: list[str] = field(default_factory=list)
    name_parts: list[str] = field(default_factory=list)
    birth_dates: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def read_test_file(name: str, **kwargs: Any) -> pydicom.FileDataset:
    """A pydicom test object, read from the installed package (never downloaded)."""
    return pydicom.dcmread(TEST_FILES / name, **kwargs)


def to_bytes(ds: Dataset, **kwargs: Any) -> bytes:
    """``ds`` encoded as it would be on disk (its own transfer syntax unless told)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, **kwargs)
    return buffer.getvalue()


class _Planter:
    """Gives objects their new patient and plants the PHI the import must not leak."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = random.Random(seed)
        pairs = [(last, first) for last in _LAST for first in _FIRST][1:]
        rng.shuffle(pairs)
        # The first patient is always DOE^JANE^Q, so tests can name a known leak.
        self._pairs = iter([("DOE", "JANE"), *pairs])
        self._initials = iter(["Q", *(rng.choice("ABCDEFGHKLMNRSTW") for _ in pairs)])
        self.people: dict[str, tuple[str, str, str]] = {}  # id -> (PN, folder, birth date)
        self.phi = _Phi()
        self._uid_count = 0

    def person(self, patient: str) -> tuple[str, str, str]:
        if patient not in self.people:
            last, first = next(self._pairs)
            name = f"{last}^{first}^{next(self._initials)}"
            folder = f"{last}_{first}"
            born = _BIRTH_DATES[len(self.people) % len(_BIRTH_DATES)]
            self.people[patient] = (name, folder, born)
            self.phi.names.append(name)
            self.phi.name_parts += [last, first]
            if born not in self.phi.birth_dates:
                self.phi.birth_dates.append(born)
        return self.people[patient]

    def uid(self, *what: str) -> str:
        self._uid_count += 1
        uid = str(generate_uid(entropy_srcs=[str(self.seed), *what, str(self._uid_count)]))
        self.phi.uids.append(uid)
        return uid

    def plant(self, ds: Dataset, patient: str, study_uid: str, series_uid: str | None,
              force_uids: bool = False) -> Dataset:
        """Re-key ``ds`` to ``patient``; fresh UIDs replace those present (or all three
        when ``force_uids``: series membership must then be what the test says)."""
        name, _, born = self.person(patient)
        ds.PatientID = patient
        ds.PatientName = name
        ds.PatientBirthDate = born
        if force_uids or "StudyInstanceUID" in ds:
            ds.StudyInstanceUID = study_uid
        if series_uid is not None and (force_uids or "SeriesInstanceUID" in ds):
            ds.SeriesInstanceUID = series_uid
        if force_uids or "SOPInstanceUID" in ds:
            ds.SOPInstanceUID = self.uid(patient, "sop")
            meta = getattr(ds, "file_meta", None)
            if meta is not None and "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def equal_channel_rgb(rows: int = 48, cols: int = 64) -> np.ndarray:
    """A grayscale gradient stored as RGB with three identical channels."""
    gray = (np.add.outer(np.arange(rows) * 3, np.arange(cols) * 2) % 256).astype(np.uint8)
    return np.stack([gray, gray, gray], axis=-1)


def tiff_pages(rows: int = 40, cols: int = 60, pages: int = 3) -> list[np.ndarray]:
    """Distinct 8-bit pages: page k is a gradient plus 50 k, so the middle is recognisable."""
    base = np.add.outer(np.arange(rows), np.arange(cols)).astype(np.int64)
    return [((base + 50 * k) % 256).astype(np.uint8) for k in range(pages)]


def _tiff(pages: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    images = [Image.fromarray(page) for page in pages]
    images[0].save(buffer, format="TIFF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def _collect(planter: _Planter) -> tuple[list[_File], dict[str, Any]]:
    """Every file of the export, with the facts the manifest reports about them."""
    files: list[_File] = []
    facts: dict[str, Any] = {}
    counter = iter(range(1, 1000))

    def next_patient() -> str:
        return f"P{next(counter):03d}"

    def study(patient: str) -> str:
        return planter.uid(patient, "study")

    # P001: a CT series of CT_SLICES slices with known content, a 1-slice scout with a
    # *lower* series number (so only the "most instances" rule picks the main series),
    # an RT plan and a structured report.
    ct_patient = next_patient()
    ct_study = study(ct_patient)
    main_series, scout_series = planter.uid(ct_patient, "ct"), planter.uid(ct_patient, "scout")
    for k, offset in enumerate(CT_OFFSETS, start=1):
        ds = planter.plant(read_test_file("CT_small.dcm"), ct_patient, ct_study, main_series,
                           force_uids=True)
        ds.SeriesNumber, ds.InstanceNumber = 2, k
        raw = ds.pixel_array.astype(np.int32) + offset
        ds.PixelData = raw.astype("<i2").tobytes()
        files.append(_File("ct_slice", "CT_small.dcm", ct_patient, to_bytes(ds), series=2))
    ds = planter.plant(read_test_file("CT_small.dcm"), ct_patient, ct_study, scout_series,
                       force_uids=True)
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    files.append(_File("ct_scout", "CT_small.dcm", ct_patient, to_bytes(ds), series=1))
    for series, (source, role) in enumerate((("rtplan.dcm", "rtplan"),
                                             ("test-SR.dcm", "sr")), start=3):
        ds = planter.plant(read_test_file(source), ct_patient, ct_study,
                           planter.uid(ct_patient, role))
        files.append(_File(role, source, ct_patient, to_bytes(ds), series=series,
                           skip=[CATEGORY_NO_PIXELS]))
    facts["ct_patient"] = ct_patient

    # One patient per decodable transfer syntax (CT_small is covered by P001).
    by_source: dict[str, str] = {"CT_small.dcm": ct_patient}
    for source in DECODABLE:
        if source == "CT_small.dcm":
            continue
        patient = next_patient()
        ds = planter.plant(read_test_file(source), patient, study(patient),
                           planter.uid(patient, "series"))
        files.append(_File("image", source, patient, to_bytes(ds)))
        by_source[source] = patient
    mr_patient = by_source["MR_small.dcm"]
    facts["by_source_patient"] = by_source

    # The MR patient also has a PNG named after them: the DICOM must win.
    gray = equal_channel_rgb()[..., 0]
    files.append(_File("png_duplicate", "generated", mr_patient, _png(gray),
                       name=f"{mr_patient}.png"))
    ds = planter.plant(read_test_file("reportsi.dcm"), mr_patient, study(mr_patient),
                       planter.uid(mr_patient, "sr"))
    files.append(_File("sr", "reportsi.dcm", mr_patient, to_bytes(ds), series=2,
                       skip=[CATEGORY_NO_PIXELS]))

    # MONOCHROME1: MR_small with inverted stored values, so that the import's inversion
    # (min + max - v) gives back exactly the MONOCHROME2 original.
    patient = next_patient()
    ds = planter.plant(read_test_file("MR_small.dcm"), patient, study(patient),
                       planter.uid(patient, "series"))
    original = ds.pixel_array.astype(np.int32)
    inverted = original.min() + original.max() - original
    ds.PixelData = inverted.astype("<i2").tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    files.append(_File("monochrome1", "MR_small.dcm", patient, to_bytes(ds)))
    facts["monochrome1"] = patient

    # A "no meta" file: MR_small without preamble and file meta, implicit VR.
    patient = next_patient()
    ds = planter.plant(read_test_file("MR_small.dcm"), patient, study(patient),
                       planter.uid(patient, "series"))
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    files.append(_File("no_meta", "MR_small.dcm", patient,
                       to_bytes(ds, implicit_vr=True, little_endian=True)))
    facts["no_meta"] = patient

    # Files named by patient id: an RGB PNG with three equal channels, a 3-page TIFF.
    patient = next_patient()
    files.append(_File("png_rgb_equal", "generated", patient, _png(equal_channel_rgb()),
                       name=f"{patient}.png"))
    facts["png"] = patient
    patient = next_patient()
    files.append(_File("tiff", "generated", patient, _tiff(tiff_pages()),
                       name=f"{patient}.tif"))
    facts["tiff"] = patient

    # Patients whose only file is unusable.
    facts["no_image"] = []
    patient = next_patient()
    ds = planter.plant(read_test_file("MR_truncated.dcm"), patient, study(patient),
                       planter.uid(patient, "series"))
    files.append(_File("truncated_pixels", "MR_truncated.dcm", patient, to_bytes(ds),
                       skip=[CATEGORY_CORRUPT]))
    facts["no_image"].append(patient)
    patient = next_patient()
    ds = planter.plant(read_test_file("JPEG-lossy.dcm"), patient, study(patient),
                       planter.uid(patient, "series"))
    files.append(_File("bad_jpeg", "JPEG-lossy.dcm", patient, to_bytes(ds),
                       skip=[CATEGORY_UNDECODABLE, CATEGORY_CORRUPT]))
    facts["no_image"].append(patient)
    patient = next_patient()
    ds = planter.plant(read_test_file("CT_small.dcm"), patient, study(patient),
                       planter.uid(patient, "series"))
    whole = to_bytes(ds)
    files.append(_File("truncated_half", "CT_small.dcm", patient, whole[: len(whole) // 2],
                       skip=[CATEGORY_CORRUPT]))
    facts["no_image"].append(patient)

    # A patient who is not in the site's records.
    ds = planter.plant(read_test_file("MR_small.dcm"), ABSENT_ID, study(ABSENT_ID),
                       planter.uid(ABSENT_ID, "series"))
    files.append(_File("absent", "MR_small.dcm", ABSENT_ID, to_bytes(ds)))

    # A stray note that names a patient (PHI the import must not copy anywhere).
    ct_name, _, ct_born = planter.person(ct_patient)
    note = f"Export for research request 17.\nCheck {ct_name} CT, born {ct_born}.\n"
    files.append(_File("text", "generated", None, note.encode(), name="notes.txt",
                       skip=[CATEGORY_UNKNOWN]))
    return files, facts


def build_export(root: Path, layout: str = "nested", seed: int = 0) -> dict[str, Any]:
    """Write a PACS-style export under ``root`` and return its manifest.

    ``layout``: "nested" (``<LAST>_<FIRST>/STUDY1/SERIES<n>/IMnnnnnn``: folders named
    after patients, as some PACS exports do), "flat" (everything in ``root``) or
    "dicomdir-like" (``DICOM/<8 digits>/<8 digits>/<8 digits>/IMnnnnnn`` plus a real
    ``DICOMDIR``). DICOM files get meaningless names without extension, numbered in an
    order shuffled by ``seed`` so that name order is not instance order. PNG/TIFF files
    are named by patient id and sit in ``root``; so does ``notes.txt``.

    Manifest keys (paths are POSIX text relative to ``root``):

    * ``root``, ``layout``, ``seed``.
    * ``record_patients``: ids the site's records should list (P001...; X999 is not one).
    * ``image_patients``: record ids that must end up with an image.
    * ``no_image_patients``: record ids whose every file is unusable.
    * ``absent_ids``: ids that have an image but no record (``["X999"]``).
    * ``kinds``: id -> kind ("dicom"/"png"/"tiff") of the image that must be chosen, for
      every id with an image (including X999).
    * ``chosen``: id -> path of the file ``choose`` must pick.
    * ``sources``: id -> pydicom test file (or "generated") behind the chosen file.
    * ``by_source``: decodable test file name (keys of ``DECODABLE``) -> its path.
    * ``files``: path -> {"patient": id or None, "source": ..., "role": ...} for every
      file. Roles: ct_slice, ct_scout, image, monochrome1, no_meta, png_duplicate,
      png_rgb_equal, tiff, sr, rtplan, truncated_pixels, truncated_half, bad_jpeg,
      absent, text, dicomdir.
    * ``skips``: path -> list of acceptable skip categories (``CATEGORY_*`` values) for
      each file that ``probe`` or ``decode`` must reject.
    * ``phi``: {"names": PatientName values ("DOE^JANE^Q"), "name_parts": the last and
      first names, "birth_dates", "uids": every planted Study/Series/SOP Instance UID,
      "folders": folder names that are patient names}; ``phi_strings``: all of them in
      one list, for "never appears in any output" checks.
    * ``ct_series``: {"patient", "paths" (by InstanceNumber 1..k), "offsets" (added to
      CT_small's stored values in slice k), "chosen" (the middle: InstanceNumber 3),
      "chosen_offset", "scout", "intercept" (RescaleIntercept, -1024)}.
    * ``monochrome1``: {"patient", "path", "reference" (the MONOCHROME2 MR_small export
      whose pixels the inverted import must equal)}.
    * ``no_meta``: {"patient", "path", "reference"}: MR_small without preamble or meta.
    * ``png``: {"patient", "path"} (RGB with equal channels, see ``equal_channel_rgb``);
      ``tiff``: {"patient", "path", "pages", "middle_page"} (pages from ``tiff_pages``);
      ``png_duplicate``: {"patient", "path"} (a PNG of a patient who also has DICOM).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    planter = _Planter(seed)
    files, facts = _collect(planter)

    numbers = list(range(1, sum(1 for f in files if not f.name) + 1))
    random.Random(seed).shuffle(numbers)
    number_of = iter(numbers)
    dirs: dict[tuple[str, ...], int] = {}  # dicomdir-like: one running folder number

    def dir_number(*key: str) -> int:
        return dirs.setdefault(key, len(dirs) + 1)

    paths: list[str] = []
    for f in files:
        if f.name:
            rel = f.name
        else:
            im = f"IM{next(number_of):06d}"
            person = f.patient or ""
            if layout == "flat":
                rel = im
            elif layout == "nested":
                folder = planter.person(person)[1]
                if folder not in planter.phi.folders:
                    planter.phi.folders.append(folder)
                rel = f"{folder}/STUDY1/SERIES{f.series}/{im}"
            else:
                numbers_ = (dir_number("patient", person), dir_number("study", person),
                            dir_number("series", person, str(f.series)))
                rel = "DICOM/" + "/".join(f"{n:08d}" for n in numbers_) + f"/{im}"
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.data)
        paths.append(rel)

    manifest_files = {rel: {"patient": f.patient, "source": f.source, "role": f.role}
                      for rel, f in zip(paths, files, strict=True)}
    skips = {rel: list(f.skip) for rel, f in zip(paths, files, strict=True) if f.skip}
    if layout == "dicomdir-like":
        (root / "DICOMDIR").write_bytes((TEST_FILES / "dicomdirtests" / "DICOMDIR").read_bytes())
        manifest_files["DICOMDIR"] = {"patient": None, "source": "dicomdirtests/DICOMDIR",
                                      "role": "dicomdir"}
        skips["DICOMDIR"] = [CATEGORY_NO_PIXELS]

    def path_of(role: str, patient: str | None = None) -> str:
        return next(rel for rel, f in zip(paths, files, strict=True)
                    if f.role == role and (patient is None or f.patient == patient))

    ct_patient = facts["ct_patient"]
    ct_paths = [rel for rel, f in zip(paths, files, strict=True) if f.role == "ct_slice"]
    middle = (CT_SLICES - 1) // 2
    chosen: dict[str, str] = {ct_patient: ct_paths[middle]}
    sources: dict[str, str] = {ct_patient: "CT_small.dcm"}
    by_source: dict[str, str] = {"CT_small.dcm": ct_paths[middle]}
    for source, patient in facts["by_source_patient"].items():
        if patient != ct_patient:
            chosen[patient] = path_of("image", patient)
            sources[patient] = source
            by_source[source] = chosen[patient]
    for role, key in (("monochrome1", "monochrome1"), ("no_meta", "no_meta"),
                      ("png_rgb_equal", "png"), ("tiff", "tiff")):
        chosen[facts[key]] = path_of(role)
        sources[facts[key]] = "generated" if role in ("png_rgb_equal", "tiff") \
            else "MR_small.dcm"
    chosen[ABSENT_ID] = path_of("absent")
    sources[ABSENT_ID] = "MR_small.dcm"
    kinds = {patient: ("png" if rel.endswith(".png") else "tiff" if rel.endswith(".tif")
                       else "dicom") for patient, rel in chosen.items()}

    record_patients = sorted({f.patient for f in files if f.patient and f.patient != ABSENT_ID})
    image_patients = sorted(p for p in chosen if p != ABSENT_ID)
    phi = planter.phi
    phi_strings = sorted({*phi.names, *phi.name_parts, *phi.birth_dates, *phi.uids,
                          *phi.folders})
    mr_reference = by_source["MR_small.dcm"]
    return {
        "root": str(root),
        "layout": layout,
        "seed": seed,
        "record_patients": record_patients,
        "image_patients": image_patients,
        "no_image_patients": sorted(facts["no_image"]),
        "absent_ids": [ABSENT_ID],
        "kinds": kinds,
        "chosen": chosen,
        "sources": sources,
        "by_source": by_source,
        "files": manifest_files,
        "skips": skips,
        "phi": {"names": list(phi.names), "name_parts": list(phi.name_parts),
                "birth_dates": list(phi.birth_dates), "uids": list(phi.uids),
                "folders": list(phi.folders)},
        "phi_strings": phi_strings,
        "ct_series": {"patient": ct_patient, "paths": ct_paths, "offsets": list(CT_OFFSETS),
                      "chosen": ct_paths[middle], "chosen_offset": CT_OFFSETS[middle],
                      "scout": path_of("ct_scout"), "intercept": -1024},
        "monochrome1": {"patient": facts["monochrome1"], "path": path_of("monochrome1"),
                        "reference": mr_reference},
        "no_meta": {"patient": facts["no_meta"], "path": path_of("no_meta"),
                    "reference": mr_reference},
        "png": {"patient": facts["png"], "path": path_of("png_rgb_equal")},
        "tiff": {"patient": facts["tiff"], "path": path_of("tiff"), "pages": 3,
                 "middle_page": 1},
        "png_duplicate": {"patient": facts["by_source_patient"]["MR_small.dcm"],
                          "path": path_of("png_duplicate")},
    }
