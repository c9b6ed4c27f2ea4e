"""The pixel layer of `mmfed data import`, on real DICOM objects and real image files.

Every DICOM object comes from pydicom's own test files, re-keyed into a PACS-style
export by tests/dicom_exports.py; PNG/TIFF/JPEG/NPY files are written with Pillow and
NumPy. Expected values are computed independently with pydicom's public API, so these
tests check our rules, not our reading of the format.
"""

from __future__ import annotations

import io
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

from mmfed.data.pixels import (
    CATEGORY_BAD_PIXELS,
    CATEGORY_CORRUPT,
    CATEGORY_NO_PATIENT,
    CATEGORY_NO_PIXELS,
    CATEGORY_UNDECODABLE,
    CATEGORY_UNKNOWN,
    Candidate,
    SkipFile,
    choose,
    decode,
    equal_channels,
    luminance,
    probe,
)
from tests.dicom_exports import (
    DECODABLE,
    LAYOUTS,
    TEST_FILES,
    build_export,
    equal_channel_rgb,
    tiff_pages,
)

COLOUR_WARNING = re.compile(r"^colour image \((.+)\) converted to luminance \(BT\.601\)$")
UID_LIKE = re.compile(r"\d+(\.\d+){3,}")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_export(tmp_path_factory.mktemp("pacs") / "export", "nested")


def at(export: dict, rel: str) -> Path:
    return Path(export["root"]) / rel


def native(path: Path):
    """Decode at the image's own size, so no pad/resize step blurs the comparison."""
    candidate = probe(path)
    return candidate, decode(candidate, (candidate.rows, candidate.cols))


def stored(path: Path, **kwargs) -> np.ndarray:
    """pydicom's own decoding of the stored values (the independent reference)."""
    return pixel_array(str(path), **kwargs)


def skip_of(path: Path, size: tuple[int, int] = (32, 32)) -> SkipFile:
    """The SkipFile that probe or decode raises for `path` (failing if none does)."""
    with pytest.raises(SkipFile) as info:
        decode(probe(path), size)
    return info.value


def _ts_id(source: str) -> str:
    ts = DECODABLE[source][0]
    return re.sub(r"[^a-z0-9]+", "-", ts.lower()).strip("-") + "-" + Path(source).stem


# --- transfer syntaxes ------------------------------------------------------------------

@pytest.mark.parametrize("source", list(DECODABLE), ids=[_ts_id(s) for s in DECODABLE])
def test_every_transfer_syntax_decodes_to_the_requested_size(export, source):
    path = at(export, export["by_source"][source])
    header = pydicom.dcmread(path, stop_before_pixels=True)
    transfer_syntax, photometric = DECODABLE[source]
    assert header.file_meta.TransferSyntaxUID.name == transfer_syntax
    assert header.PhotometricInterpretation == photometric

    candidate = probe(path)
    assert candidate.kind == "dicom"
    assert export["files"][export["by_source"][source]]["patient"] == candidate.patient_id
    decoded = decode(candidate, (24, 40))
    assert decoded.pixels.shape == (24, 40)
    assert decoded.pixels.dtype == np.float32
    assert np.isfinite(decoded.pixels).all()
    assert decoded.pixels.std() > 0
    assert all(isinstance(t, str) and "\n" not in t for t in decoded.transforms)


@pytest.mark.parametrize("source", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                    "MR_small_jp2klossless.dcm", "no_meta"])
def test_lossless_encodings_give_the_original_values(export, source):
    reference = at(export, export["by_source"]["MR_small.dcm"])
    rel = export["no_meta"]["path"] if source == "no_meta" else export["by_source"][source]
    _, expected = native(reference)
    _, decoded = native(at(export, rel))
    np.testing.assert_array_equal(decoded.pixels, expected.pixels)
    np.testing.assert_array_equal(expected.pixels, stored(reference).astype(np.float32))
    assert decoded.transforms == [] and decoded.warnings == []


def test_no_meta_file_is_found_by_content(export):
    path = at(export, export["no_meta"]["path"])
    assert path.read_bytes()[128:132] != b"DICM"
    assert probe(path).patient_id == export["no_meta"]["patient"]


# --- monochrome rules -------------------------------------------------------------------

def test_modality_lut_adds_the_rescale_intercept(export):
    path = at(export, export["ct_series"]["scout"])  # CT_small's own stored values
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert float(header.RescaleIntercept) == export["ct_series"]["intercept"] == -1024
    _, decoded = native(path)
    np.testing.assert_array_equal(decoded.pixels, stored(path).astype(np.float32) - 1024)
    assert decoded.transforms == ["modality LUT (slope 1, intercept -1024)"]


def test_identity_rescale_is_not_recorded(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.RescaleIntercept = 0
    ds.save_as(tmp_path / "IM1")
    _, decoded = native(tmp_path / "IM1")
    assert decoded.transforms == []
    np.testing.assert_array_equal(decoded.pixels, stored(tmp_path / "IM1").astype(np.float32))


def test_monochrome1_is_inverted_back_to_the_monochrome2_original(export):
    _, original = native(at(export, export["monochrome1"]["reference"]))
    _, inverted = native(at(export, export["monochrome1"]["path"]))
    assert inverted.transforms == ["MONOCHROME1 inverted"]
    np.testing.assert_array_equal(inverted.pixels, original.pixels)
    raw = stored(at(export, export["monochrome1"]["path"])).astype(np.float32)
    np.testing.assert_array_equal(inverted.pixels, raw.min() + raw.max() - raw)


# --- colour -----------------------------------------------------------------------------

@pytest.mark.parametrize("source, photometric", [
    ("examples_rgb_color.dcm", "RGB"),
    ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL"),
    ("SC_rgb_rle_2frame.dcm", "RGB"),
    ("ExplVR_BigEnd.dcm", "RGB"),
])
def test_colour_dicom_becomes_luminance_with_a_warning(export, source, photometric):
    path = at(export, export["by_source"][source])
    _, decoded = native(path)
    # pydicom 3 returns RGB for YBR_FULL(_422) by default: converting again would be wrong.
    expected = luminance(stored(path, index=0))
    np.testing.assert_allclose(decoded.pixels, expected, rtol=0, atol=1e-4)
    assert decoded.warnings == [f"colour image ({photometric}) converted to luminance (BT.601)"]
    assert ("YBR_FULL converted to RGB" in decoded.transforms) == (photometric == "YBR_FULL")


def test_palette_colour_is_applied_then_made_luminance(export):
    path = at(export, export["by_source"]["examples_palette.dcm"])
    _, decoded = native(path)
    rgb = apply_color_lut(stored(path), pydicom.dcmread(path))
    np.testing.assert_allclose(decoded.pixels, luminance(rgb), rtol=0, atol=1e-3)
    assert decoded.transforms[0] == "palette colour lookup table applied"
    assert decoded.warnings == ["colour image (PALETTE COLOR) converted to luminance (BT.601)"]


def test_rgb_png_with_equal_channels_passes_without_warning(export):
    candidate, decoded = native(at(export, export["png"]["path"]))
    assert candidate.kind == "png" and candidate.patient_id == export["png"]["patient"]
    assert decoded.warnings == []
    assert decoded.transforms == ["equal colour channels -> one channel"]
    np.testing.assert_array_equal(decoded.pixels, equal_channel_rgb()[..., 0])


def test_equal_channels_and_luminance():
    gray = equal_channel_rgb()
    np.testing.assert_array_equal(equal_channels(gray), gray[..., 0])
    alpha = np.concatenate([gray, np.full((*gray.shape[:2], 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(equal_channels(alpha), gray[..., 0])  # alpha ignored
    colour = gray.copy()
    colour[0, 0, 2] += 1
    assert equal_channels(colour) is None
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    out = luminance(primaries)
    assert out.dtype == np.float32 and out.shape == (1, 3)
    np.testing.assert_allclose(out[0], [0.299 * 255, 0.587 * 255, 0.114 * 255], rtol=1e-6)
    rgba = np.concatenate([primaries, np.full((1, 3, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_allclose(luminance(rgba), out)
    with pytest.raises(ValueError):
        equal_channels(np.zeros((4, 4)))


def test_real_colour_jpeg_palette_png_and_la_png(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "P1.jpg", quality=95)
    Image.fromarray(colour).convert("P").save(tmp_path / "P2.png")
    Image.fromarray(colour[..., 0]).convert("LA").save(tmp_path / "P3.png")
    jpeg = decode(probe(tmp_path / "P1.jpg"), (30, 40))
    assert probe(tmp_path / "P1.jpg").kind == "jpeg"
    assert jpeg.warnings == ["colour image (RGB) converted to luminance (BT.601)"]
    palette = decode(probe(tmp_path / "P2.png"), (30, 40))
    assert palette.transforms[0] == "palette -> RGB"
    assert palette.warnings == ["colour image (palette) converted to luminance (BT.601)"]
    la = decode(probe(tmp_path / "P3.png"), (30, 40))
    assert la.warnings == [] and la.transforms == ["LA -> L (alpha dropped)"]
    np.testing.assert_array_equal(la.pixels, colour[..., 0])


# --- frames, pages, slices --------------------------------------------------------------

def test_multiframe_ultrasound_uses_the_middle_frame(export):
    path = at(export, export["by_source"]["examples_ybr_color.dcm"])
    candidate, decoded = native(path)
    assert candidate.frames == 30
    assert decoded.transforms[:2] == ["frame 15 of 30 (middle)", "YBR_FULL_422 converted to RGB"]
    middle = luminance(stored(path, index=14))
    np.testing.assert_allclose(decoded.pixels, middle, rtol=0, atol=1e-4)
    assert not np.allclose(middle, luminance(stored(path, index=0)), atol=1)


def test_multiframe_dose_uses_the_middle_frame(export):
    path = at(export, export["by_source"]["rtdose.dcm"])
    _, decoded = native(path)
    assert decoded.transforms == ["frame 8 of 15 (middle)"]
    np.testing.assert_array_equal(decoded.pixels, stored(path, index=7).astype(np.float32))


def test_multipage_tiff_uses_the_middle_page(export):
    candidate, decoded = native(at(export, export["tiff"]["path"]))
    assert (candidate.kind, candidate.frames) == ("tiff", 3)
    assert decoded.transforms == ["page 2 of 3 (middle)"]
    np.testing.assert_array_equal(decoded.pixels, tiff_pages()[export["tiff"]["middle_page"]])


def test_npy_stacks_colour_and_16_bit_png(tmp_path):
    stack = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    np.save(tmp_path / "P1.npy", stack)
    candidate, decoded = native(tmp_path / "P1.npy")
    assert (candidate.kind, candidate.frames, candidate.patient_id) == ("npy", 5, "P1")
    assert decoded.transforms == ["slice 3 of 5 (middle)"]
    np.testing.assert_array_equal(decoded.pixels, stack[2])

    colour = np.random.default_rng(1).random((6, 7, 3))
    np.save(tmp_path / "P2.npy", colour)
    _, decoded = native(tmp_path / "P2.npy")
    assert decoded.warnings == ["colour image (array) converted to luminance (BT.601)"]

    deep = (np.arange(20 * 30, dtype=np.uint16) * 100).reshape(20, 30)
    Image.fromarray(deep).save(tmp_path / "P3.png")
    _, decoded = native(tmp_path / "P3.png")
    np.testing.assert_array_equal(decoded.pixels, deep)


# --- choosing one image per patient -----------------------------------------------------

def candidates_of(export: dict, patient: str) -> list[Candidate]:
    found = []
    for rel, info in export["files"].items():
        if info["patient"] == patient:
            try:
                found.append(probe(at(export, rel)))
            except SkipFile:
                pass
    return found


def test_choose_takes_the_middle_instance_of_the_largest_series(export):
    series = export["ct_series"]
    candidates = candidates_of(export, series["patient"])
    assert len(candidates) == len(series["paths"]) + 1  # the slices and the scout
    chosen, rule = choose(candidates, Path(export["root"]))
    assert chosen.path == at(export, series["chosen"])
    assert rule == "series with most images (5 of 2 series), middle instance 3 of 5"
    _, decoded = native(chosen.path)
    raw = stored(at(export, export["ct_series"]["scout"])).astype(np.float32)
    np.testing.assert_array_equal(decoded.pixels, raw + series["chosen_offset"] - 1024)

    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(candidates)
        assert choose(candidates, Path(export["root"])) == (chosen, rule)


def test_choose_prefers_dicom_over_a_png_of_the_same_patient(export):
    duplicate = export["png_duplicate"]
    candidates = candidates_of(export, duplicate["patient"])
    assert sorted(c.kind for c in candidates) == ["dicom", "png"]
    for order in (candidates, candidates[::-1]):
        chosen, rule = choose(order, Path(export["root"]))
        assert chosen.kind == "dicom"
        assert chosen.path == at(export, export["chosen"][duplicate["patient"]])
        assert rule == "DICOM preferred over 1 other file(s)"


def _c(path: str, kind: str = "dicom", uid: str = "", number: int | None = None,
       instance: int | None = None) -> Candidate:
    return Candidate(path=Path("/x") / path, kind=kind, patient_id="P1", series_uid=uid,
                     series_number=number, instance_number=instance, frames=1, rows=8, cols=8)


def test_choose_tie_breaks():
    root = Path("/x")
    tie = [_c("b/1", uid="s5", number=5, instance=1), _c("b/2", uid="s5", number=5, instance=2),
           _c("a/1", uid="s3", number=3, instance=1), _c("a/2", uid="s3", number=3, instance=2)]
    chosen, rule = choose(tie, root)
    assert chosen.path == root / "a/1"
    assert rule == ("series with most images (2 of 2 series), tie broken by lowest series "
                    "number, middle instance 1 of 2")
    no_number = [_c("a/1", uid="n", instance=1), _c("z/1", uid="s9", number=9, instance=1)]
    assert choose(no_number, root)[0].path == root / "z/1"  # None sorts last
    same_number = [_c("q/1", uid="u1", number=1), _c("p/1", uid="u2", number=1)]
    chosen, rule = choose(same_number, root)
    assert chosen.path == root / "p/1" and "tie broken by path" in rule
    unnumbered = [_c("a", uid="s", instance=None), _c("b", uid="s", instance=2),
                  _c("c", uid="s", instance=1)]
    assert choose(unnumbered, root)[0].path == root / "b"  # order 1, 2, None: middle is 2
    files = [_c("z.png", kind="png"), _c("a.tif", kind="tiff"), _c("m.npy", kind="npy")]
    assert choose(files, root) == (files[1], "first of 3 non-DICOM files by path")
    with pytest.raises(ValueError):
        choose([], root)


# --- skips ------------------------------------------------------------------------------

def test_export_skips_have_the_documented_categories(export):
    by_role = {info["role"]: rel for rel, info in export["files"].items()}
    sr = skip_of(at(export, by_role["sr"]))
    assert sr.category == CATEGORY_NO_PIXELS and "SR" in sr.detail.split(", ")[0]
    plan = skip_of(at(export, by_role["rtplan"]))
    assert plan.category == CATEGORY_NO_PIXELS and plan.detail.startswith("RTPLAN")
    with pytest.raises(SkipFile) as info:
        probe(at(export, by_role["truncated_half"]))
    assert info.value.category == CATEGORY_CORRUPT
    assert skip_of(at(export, by_role["truncated_pixels"])).category == CATEGORY_CORRUPT
    with pytest.raises(SkipFile) as info:
        probe(at(export, by_role["text"]))
    assert info.value.category == CATEGORY_UNKNOWN
    bad = skip_of(at(export, by_role["bad_jpeg"]))
    assert bad.category in (CATEGORY_UNDECODABLE, CATEGORY_CORRUPT)
    assert bad.detail == "JPEG Extended (Process 2 and 4)"


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_16.dcm", "image_dfl.dcm"])
def test_dicom_without_patient_id(tmp_path, name):
    (tmp_path / "IM1").write_bytes((TEST_FILES / name).read_bytes())
    with pytest.raises(SkipFile) as info:
        probe(tmp_path / "IM1")
    assert info.value.category == CATEGORY_NO_PATIENT


def test_truncated_headers_and_strays(tmp_path):
    whole = (TEST_FILES / "CT_small.dcm").read_bytes()
    for cut in (140, 300, 1000, 5000, 7000):
        (tmp_path / f"cut{cut}").write_bytes(whole[:cut])
        with pytest.raises(SkipFile) as info:
            probe(tmp_path / f"cut{cut}")
        assert info.value.category == CATEGORY_CORRUPT, cut
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("IM1", whole)
    strays = {"export.zip": buffer.getvalue(), "empty": b"", "profile.icc":
              (TEST_FILES / "crayons.icc").read_bytes(), "README": b"Patient list\n"}
    for name, data in strays.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SkipFile) as info:
            probe(tmp_path / name)
        assert info.value.category == CATEGORY_UNKNOWN, name


def test_type_comes_from_content_not_extension(tmp_path):
    # CT_small's preamble is a TIFF header (a dual DICOM/TIFF file): DICM must win.
    (tmp_path / "scan.tif").write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    assert (tmp_path / "scan.tif").read_bytes()[:4] == b"II*\x00"
    assert probe(tmp_path / "scan.tif").kind == "dicom"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "P7.dcm", format="PNG")
    assert probe(tmp_path / "P7.dcm").kind == "png"


def test_bad_pixel_values(tmp_path, monkeypatch):
    nan = np.ones((8, 8), np.float32)
    nan[3, 3] = np.nan
    arrays = {"nan": nan, "inf": np.full((8, 8), np.inf), "tiny": np.ones((1, 1)),
              "thin": np.ones((1, 9)), "four": np.ones((2, 3, 4, 5)), "flat": np.ones(9),
              "empty": np.ones((0, 5)), "complex": np.ones((4, 4), complex),
              "objects": np.array([[1, "a"], [2, "b"]], dtype=object)}
    for name, arr in arrays.items():
        np.save(tmp_path / f"{name}.npy", arr, allow_pickle=True)
        assert skip_of(tmp_path / f"{name}.npy").category == CATEGORY_BAD_PIXELS, name
    constant = tmp_path / "constant.npy"
    np.save(constant, np.full((8, 8), 3.0))
    assert (decode(probe(constant), (4, 4)).pixels == 3).all()  # constant is fine

    np.save(tmp_path / "short.npy", np.ones((50, 50)))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[: len(data) // 2])
    assert skip_of(tmp_path / "short.npy").category == CATEGORY_CORRUPT

    Image.fromarray(equal_channel_rgb()).save(tmp_path / "half.png")
    data = (tmp_path / "half.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    assert skip_of(tmp_path / "half.png").category == CATEGORY_CORRUPT

    Image.fromarray(equal_channel_rgb()).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert skip_of(tmp_path / "bomb.png").category == CATEGORY_BAD_PIXELS


def test_probe_and_decode_raise_only_skipfile_on_mangled_files(export, tmp_path):
    rng = random.Random(3)
    sources = [export["by_source"][s] for s in ("CT_small.dcm", "693_J2KI.dcm",
                                                 "examples_ybr_color.dcm", "image_dfl.dcm",
                                                 "SC_rgb_rle_2frame.dcm")]
    sources += [export["png"]["path"], export["tiff"]["path"], export["no_meta"]["path"]]
    for k, rel in enumerate(sources):
        data = at(export, rel).read_bytes()
        for j in range(12):
            mangled = bytearray(data[: rng.randrange(1, len(data))])
            if j % 2:
                for _ in range(8):
                    mangled[rng.randrange(len(mangled))] = rng.randrange(256)
            path = tmp_path / f"f{k}_{j}"
            path.write_bytes(bytes(mangled))
            try:
                decoded = decode(probe(path), (16, 16))
            except SkipFile as exc:
                assert exc.category in {CATEGORY_UNKNOWN, CATEGORY_CORRUPT, CATEGORY_NO_PIXELS,
                                        CATEGORY_NO_PATIENT, CATEGORY_UNDECODABLE,
                                        CATEGORY_BAD_PIXELS}
            else:
                assert decoded.pixels.shape == (16, 16)
                assert np.isfinite(decoded.pixels).all()


# --- the whole export, every layout, and PHI --------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_manifest_and_no_phi_in_any_text(tmp_path, layout):
    export = build_export(tmp_path / "export", layout, seed=11)
    root = Path(export["root"])
    texts: list[str] = []
    by_patient: dict[str, list[Candidate]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        try:
            candidate = probe(path)
        except SkipFile as exc:
            assert exc.category in export["skips"][rel], rel
            texts += [str(exc), exc.detail]
            continue
        by_patient.setdefault(candidate.patient_id, []).append(candidate)
    imported: dict[str, str] = {}
    for patient, candidates in by_patient.items():
        chosen, rule = choose(candidates, root)
        texts.append(rule)
        rel = chosen.path.relative_to(root).as_posix()
        try:
            decoded = decode(chosen, (32, 32))
        except SkipFile as exc:
            assert exc.category in export["skips"][rel], rel
            texts += [str(exc), exc.detail]
            continue
        assert export["chosen"][patient] == rel
        assert export["kinds"][patient] == chosen.kind
        imported[patient] = rel
        texts += decoded.transforms + decoded.warnings
    assert sorted(imported) == sorted(export["image_patients"] + export["absent_ids"])
    assert not set(export["no_image_patients"]) & set(imported)

    everything = "\n".join(texts)
    assert export["phi"]["names"] and export["phi"]["uids"] and export["phi"]["birth_dates"]
    assert ("DOE_JANE" in export["phi"]["folders"]) == (layout == "nested")
    leaked = [s for s in export["phi_strings"] if s in everything]
    assert leaked == []
    assert not UID_LIKE.search(everything)


# --- resizing ---------------------------------------------------------------------------

def test_aspect_preserving_pad_then_resize(tmp_path):
    tall = np.arange(100 * 50, dtype=np.float64).reshape(100, 50) + 10
    np.save(tmp_path / "P1.npy", tall)
    candidate = probe(tmp_path / "P1.npy")
    small = decode(candidate, (64, 64))
    assert small.transforms == ["padded 100x50 -> 100x100", "resized 100x100 -> 64x64"]
    assert small.pixels.shape == (64, 64) and small.pixels.dtype == np.float32
    padded = decode(candidate, (100, 100))
    assert padded.transforms == ["padded 100x50 -> 100x100"]
    assert (padded.pixels[:, :25] == 10).all() and (padded.pixels[:, 75:] == 10).all()
    np.testing.assert_array_equal(padded.pixels[:, 25:75], tall)

    np.save(tmp_path / "P2.npy", tall.T)
    wide = decode(probe(tmp_path / "P2.npy"), (30, 20))
    assert wide.transforms == ["padded 50x100 -> 150x100", "resized 150x100 -> 30x20"]


def test_box_when_shrinking_bilinear_when_enlarging(tmp_path):
    blocks = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((4, 4)))
    np.save(tmp_path / "P1.npy", blocks)
    shrunk = decode(probe(tmp_path / "P1.npy"), (2, 2))
    np.testing.assert_array_equal(shrunk.pixels, [[1, 2], [3, 4]])  # BOX: block means
    grown = decode(probe(tmp_path / "P1.npy"), (32, 32))
    assert grown.transforms == ["resized 8x8 -> 32x32"]
    assert grown.pixels.min() >= 1 and grown.pixels.max() <= 4
    assert len(np.unique(grown.pixels)) > 4  # interpolated, not nearest
    with pytest.raises(ValueError):
        decode(probe(tmp_path / "P1.npy"), (0, 4))
