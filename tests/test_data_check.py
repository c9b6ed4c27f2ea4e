"""`mmfed data check` and the site-folder reader: every defect is one clear line, never a crash.

One valid synthetic site is generated per session and copied into ``tmp_path`` for each test,
which then corrupts its copy in exactly one way (or a few, for the "all problems at once"
tests). Most tests call ``mmfed.cli.main`` in-process for speed; a few run the installed
``mmfed`` executable to prove that the real process prints no traceback.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfed.cli import main
from mmfed.data import read_site
from mmfed.data.reader import MISSING_MARKERS
from mmfed.data.sitespec import SiteSpec, parse_site_spec, write_site_spec
from mmfed.data.synth import SynthSettings, synthesize

N = 40  # patients in the site
SIZE = 32  # image height and width (the synthetic lesions need at least ~29 pixels)
EXTRA_LINE = N + 2  # line number of a row appended to records.csv (header is line 1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def synth_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation") / "fed"
    synthesize(root, SynthSettings(sites=1, patients_per_site=N, holdout=20, genes=40,
                                   seed=0, image_size=SIZE))
    return root / "site-1"


@pytest.fixture
def site(synth_site: Path, tmp_path: Path) -> Path:
    """A private, valid copy of the synthetic site; tmp_path itself is 'outside' it."""
    dest = tmp_path / "site"
    shutil.copytree(synth_site, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------- helpers


def check(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``mmfed data check FOLDER`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["data", "check", str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def problem_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("problem: ")]


def assert_clean_failure(code: int, out: str, err: str) -> list[str]:
    """Exit 1, only `problem:` lines on stdout, only one-line messages on stderr."""
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    assert "internal error" not in err
    problems = problem_lines(out)
    assert problems, out
    assert problems == out.splitlines(), f"stdout has more than problem lines:\n{out}"
    for line in err.splitlines():
        assert line.startswith("warning: ") or "problem(s)" in line, line
    return problems


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.reader(fh))


def write_rows(path: Path, rows: list[list[str]], encoding: str = "utf-8",
               lineterminator: str = "\n", quoting: int = csv.QUOTE_MINIMAL) -> None:
    with path.open("w", newline="", encoding=encoding) as fh:
        csv.writer(fh, lineterminator=lineterminator, quoting=quoting).writerows(rows)


def set_cell(path: Path, pid: str, column: str, value: str) -> None:
    rows = read_rows(path)
    j = rows[0].index(column)
    for row in rows[1:]:
        if row[0] == pid:
            row[j] = value
            break
    else:
        raise AssertionError(f"{pid} not in {path.name}")
    write_rows(path, rows)


def append_row(path: Path, pid: str) -> None:
    """Append a copy of the first patient's row under another patient_id."""
    rows = read_rows(path)
    rows.append([pid, *rows[1][1:]])
    write_rows(path, rows)


def edit_toml(site: Path, old: str, new: str) -> None:
    path = site / "site.toml"
    text = path.read_text(encoding="utf-8")
    assert old in text, text
    path.write_text(text.replace(old, new), encoding="utf-8")


def first_image(site: Path) -> Path:
    return sorted((site / "images").glob("*.png"))[0]


def save_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    img.save(path)


def save_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal valid 8-bit MONOCHROME2 DICOM file (pydicom 3 API)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def mmfed_exe() -> list[str]:
    exe = Path(sys.executable).parent / "mmfed"
    found = str(exe) if exe.exists() else shutil.which("mmfed")
    return [found] if found else [sys.executable, "-m", "mmfed.cli"]


# --------------------------------------------------------------------------- defects

Mutation = Callable[[Path], None]


def _drop_records(site: Path) -> None:
    (site / "records.csv").unlink()


def _garbage_png(site: Path) -> None:
    first_image(site).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)


def _small_png(site: Path) -> None:
    save_png(first_image(site), np.zeros((20, SIZE), np.uint8), "L")


def _rgb_png(site: Path) -> None:
    """Real colour (channels differ); equal channels are read as grayscale."""
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0] = 200
    save_png(first_image(site), rgb, "RGB")


def _symlink_out(site: Path) -> None:
    img = first_image(site)
    outside = site.parent / "elsewhere.png"
    shutil.copy(img, outside)
    img.unlink()
    img.symlink_to(outside)


def _corrupt_dicom(site: Path) -> None:
    img = first_image(site)
    dcm = img.with_suffix(".dcm")
    save_dicom(dcm, np.zeros((SIZE, SIZE), np.uint8))
    data = dcm.read_bytes()
    # cut inside the PixelData element header: pydicom then raises struct.error
    dcm.write_bytes(data[:data.index(b"\xe0\x7f\x10\x00OB") + 8])
    img.unlink()


def _complex_npy(site: Path) -> None:
    img = first_image(site)
    np.save(img.with_suffix(".npy"), np.ones((SIZE, SIZE), np.complex64))
    img.unlink()


def _genomics_unknown(site: Path) -> None:
    rows = read_rows(site / "genomics.csv")
    rows[1][0] = "ZZZ999"
    write_rows(site / "genomics.csv", rows)


def _genomics_text(site: Path) -> None:
    rows = read_rows(site / "genomics.csv")
    rows[2][rows[0].index("GENE0003")] = "high"
    write_rows(site / "genomics.csv", rows)


def _genomics_both(site: Path) -> None:
    frame = pd.read_csv(site / "genomics.csv", dtype={"patient_id": str})
    frame.to_parquet(site / "genomics.parquet", index=False)


def _drop_label_column(site: Path) -> None:
    rows = read_rows(site / "records.csv")
    j = rows[0].index("label")
    write_rows(site / "records.csv", [r[:j] + r[j + 1:] for r in rows])


def _ragged_row(site: Path) -> None:
    with (site / "records.csv").open("a", encoding="utf-8") as fh:
        fh.write("X1,0" + ",1" * 60 + "\n")  # far more fields than the header


def _first_pid(site: Path) -> str:
    return read_rows(site / "records.csv")[1][0]


DEFECTS: list[tuple[str, Mutation, tuple[str, ...]]] = [
    ("records-missing", _drop_records, ("records.csv", "missing")),
    ("empty-patient-id", lambda s: append_row(s / "records.csv", ""),
     ("records.csv", "missing patient_id", f"line {EXTRA_LINE}")),
    ("duplicate-patient-id", lambda s: append_row(s / "records.csv", _first_pid(s)),
     ("records.csv", "duplicate patient_id", "'0100001'")),
    ("unreadable-png", _garbage_png, ("images/", "unreadable", "IMG.png")),
    ("wrong-size-image", _small_png, ("images/", "wrong size", f"{SIZE}x{SIZE}",
                                      "IMG.png is 20x32")),
    ("non-numeric-age", lambda s: set_cell(s / "records.csv", "0100003", "age", "abc"),
     ("records.csv", "non-numeric", "'age'", "'abc'", "line 4")),
    ("label-outside-classes", lambda s: set_cell(s / "records.csv", "0100003", "label", "7"),
     ("records.csv", "label outside the declared classes", "'7'", "line 4")),
    ("id-dotdot", lambda s: append_row(s / "records.csv", "../x"),
     ("records.csv", "patient_id contains", "'..'", f"line {EXTRA_LINE}")),
    ("id-slash", lambda s: append_row(s / "records.csv", "/etc/passwd"),
     ("records.csv", "patient_id contains", "'/'", f"line {EXTRA_LINE}")),
    ("id-backslash", lambda s: append_row(s / "records.csv", "a\\b"),
     ("records.csv", "patient_id contains", f"line {EXTRA_LINE}")),
    ("image-symlink-outside", _symlink_out, ("images/", "outside the site folder",
                                             "IMG.png")),
    ("site-toml-missing", lambda s: (s / "site.toml").unlink(), ("site.toml", "missing")),
    ("site-toml-invalid", lambda s: edit_toml(s, "[task]", "[task"),
     ("site.toml", "not valid TOML")),
    ("site-toml-classes-not-list", lambda s: edit_toml(s, "classes = [0, 1]", 'classes = "0,1"'),
     ("site.toml", "task.classes", "'0,1'")),
    ("site-toml-classes-floats", lambda s: edit_toml(s, "classes = [0, 1]", "classes = [0.5, 1]"),
     ("site.toml", "task.classes")),
    ("site-toml-size-text", lambda s: edit_toml(s, f"size = [{SIZE}, {SIZE}]", 'size = "32x32"'),
     ("site.toml", "images.size", "'32x32'")),
    ("site-toml-size-3d", lambda s: edit_toml(s, f"size = [{SIZE}, {SIZE}]", "size = [32, 32, 1]"),
     ("site.toml", "images.size")),
    ("site-toml-modality-not-bool", lambda s: edit_toml(s, "images = true", 'images = "yes"'),
     ("site.toml", "modalities.images", "true or false")),
    ("images-dir-missing", lambda s: shutil.rmtree(s / "images"),
     ("images/", "missing", "modalities.images = true")),
    ("genomics-unknown-patient", _genomics_unknown,
     ("genomics.csv", "not in records.csv", "'ZZZ999'")),
    ("genomics-non-numeric", _genomics_text,
     ("genomics.csv", "non-numeric", "line 3", "GENE0003")),
    ("genomics-csv-and-parquet", _genomics_both, ("genomics.csv", "genomics.parquet", "keep one")),
    ("label-column-missing", _drop_label_column, ("records.csv", "no label column 'label'")),
    ("label-column-renamed-in-toml", lambda s: edit_toml(s, 'label = "label"', 'label = "dx"'),
     ("records.csv", "no label column 'dx'")),
    ("rgb-png", _rgb_png, ("images/", "IMG.png", "colour PNG", "RGB", "mmfed data import")),
    # beyond the required kinds
    ("corrupt-dicom", _corrupt_dicom, ("images/", "IMG.dcm", "not a readable DICOM")),
    ("complex-npy", _complex_npy, ("images/", "IMG.npy", "complex")),
    ("records-not-utf8", lambda s: (s / "records.csv").write_bytes(
        (s / "records.csv").read_bytes().replace(b",sex,", b",s\xe9x,", 1)),
     ("records.csv", "not UTF-8")),
    ("records-ragged-row", _ragged_row, ("records.csv", "malformed CSV")),
    ("declared-column-missing", lambda s: edit_toml(s, "[images]",
                                                    '[records]\nnumeric = ["weight"]\n\n[images]'),
     ("records.csv", "'weight'", "declared in site.toml is missing")),
    ("image-of-unknown-patient", lambda s: shutil.copy(first_image(s), s / "images" / "X9.png"),
     ("images/", "not in records.csv", "X9.png")),
    ("two-images-one-patient", lambda s: np.save(first_image(s).with_suffix(".npy"),
                                                 np.zeros((SIZE, SIZE), np.float32)),
     ("images/", "more than one image", "IMG.npy and IMG.png")),
    ("parquet-unreadable", lambda s: ((s / "genomics.csv").unlink(),
                                      (s / "genomics.parquet").write_bytes(b"PAR1 garbage")),
     ("genomics.parquet", "unreadable")),
]


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in DEFECTS])
def test_each_defect_is_one_clear_problem(site: Path, capsys: pytest.CaptureFixture[str],
                                          mutate: Mutation, expected: tuple[str, ...]) -> None:
    image = first_image(site).stem  # IMG in the expected texts: a patient with an image
    mutate(site)
    code, out, err = check(site, capsys)
    problems = assert_clean_failure(code, out, err)
    assert len(problems) == 1, "\n".join(problems)
    for text in expected:
        text = text.replace("IMG", image)
        assert text in problems[0], f"{text!r} not in {problems[0]!r}"
    result = read_site(site)  # the library agrees with the CLI and never raises
    assert result.site is None
    assert [f"problem: {p}" for p in result.problems] == problems


def test_defect_kinds_are_distinct() -> None:
    ids = [d[0] for d in DEFECTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 18


def test_decompression_bomb_png_is_a_problem_not_a_crash(
        site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 now exceeds twice the limit
    code, out, err = check(site, capsys)
    problems = assert_clean_failure(code, out, err)
    assert len(problems) == 1 and "decompression-bomb" in problems[0], problems


@pytest.mark.parametrize(("mutate", "expected"), [
    pytest.param(_garbage_png, "IMG.png", id="unreadable-png"),
    pytest.param(lambda s: edit_toml(s, "[task]", "[task"), "not valid TOML", id="bad-toml"),
    pytest.param(_corrupt_dicom, "IMG.dcm", id="corrupt-dicom"),
])
def test_real_process_prints_no_traceback(site: Path, mutate: Mutation, expected: str) -> None:
    expected = expected.replace("IMG", first_image(site).stem)
    mutate(site)
    env = {k: v for k, v in os.environ.items() if k != "MMFED_DEBUG"}
    proc = subprocess.run([*mmfed_exe(), "data", "check", str(site)], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    problems = assert_clean_failure(proc.returncode, proc.stdout, proc.stderr)
    assert len(problems) == 1 and expected in problems[0], problems


def test_real_process_valid_site(site: Path) -> None:
    proc = subprocess.run([*mmfed_exe(), "data", "check", "--quiet", str(site)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: site-1")
    assert proc.stderr == ""  # --quiet: no warnings


# --------------------------------------------------------------------------- many at once


def test_all_problems_in_a_folder_are_reported(site: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    set_cell(site / "records.csv", "0100003", "age", "abc")
    set_cell(site / "records.csv", "0100004", "label", "maybe")
    images = sorted((site / "images").glob("*.png"))
    images[0].write_bytes(b"garbage")
    save_png(images[1], np.zeros((SIZE, 8), np.uint8), "L")
    _genomics_text(site)
    code, out, err = check(site, capsys)
    problems = assert_clean_failure(code, out, err)
    wanted = ["'age'", "'maybe'", "unreadable image", "wrong size", "non-numeric expression"]
    assert len(problems) == len(wanted), "\n".join(problems)
    for text in wanted:
        assert sum(text in p for p in problems) == 1, (text, problems)


def test_all_site_toml_problems_are_reported(site: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    edit_toml(site, 'name = "site-1"', 'name = "bad name!"\ncolour = "blue"')
    edit_toml(site, "classes = [0, 1]", "classes = [1]")
    edit_toml(site, f"size = [{SIZE}, {SIZE}]", "size = [2, 5000]")
    code, out, err = check(site, capsys)
    problems = assert_clean_failure(code, out, err)
    wanted = ["'name'", "unknown key 'colour'", "task.classes", "images.size"]
    assert len(problems) == len(wanted), "\n".join(problems)
    for text in wanted:
        assert sum(text in p for p in problems) == 1, (text, problems)


# --------------------------------------------------------------------------- valid folders


def test_valid_site_passes(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(site, capsys)
    assert code == 0, out + err
    assert out.startswith("ok: site-1 [synthetic]: 40 patients")
    assert "problem" not in out and "Traceback" not in out + err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err


def test_valid_site_arrays(site: Path) -> None:
    result = read_site(site)
    assert result.ok and result.site is not None
    data = result.site
    assert len(data) == N and data.labels.dtype == np.int64
    assert set(data.labels.tolist()) <= {0, 1}
    assert data.images is not None and data.images.shape == (N, 1, SIZE, SIZE)
    assert data.genomics is not None and data.genomics.shape == (N, 40)
    assert data.numeric.shape == (N, len(data.numeric_cols)) and data.numeric.dtype == np.float32
    assert "sex" in data.categorical_cols and "age" in data.numeric_cols
    # absent images are zeros and masked out, never NaN
    assert np.isfinite(data.images).all()
    assert not data.images[~data.image_mask].any()


def test_bom_crlf_and_quoted_fields_give_the_same_patients(site: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    before = read_site(site).site
    assert before is not None
    rows = read_rows(site / "records.csv")
    j = rows[0].index("alcohol")
    rows[1][j] = "moderate, weekends only"  # a comma inside a quoted field
    rows[2][j] = 'said "none"'  # doubled quotes inside a quoted field
    for name, data in (("records.csv", rows), ("genomics.csv", read_rows(site / "genomics.csv"))):
        write_rows(site / name, data, encoding="utf-8-sig", lineterminator="\r\n",
                   quoting=csv.QUOTE_ALL)
    toml = (site / "site.toml").read_text(encoding="utf-8")
    (site / "site.toml").write_text(toml.replace("\n", "\r\n"), encoding="utf-8-sig",
                                    newline="")
    raw = (site / "records.csv").read_bytes()
    assert raw.startswith(b'\xef\xbb\xbf"patient_id"') and b"\r\n" in raw

    code, out, err = check(site, capsys)
    assert code == 0, out + err
    after = read_site(site).site
    assert after is not None
    assert after.ids == before.ids
    assert after.numeric_cols == before.numeric_cols
    assert after.categorical_cols == before.categorical_cols
    np.testing.assert_array_equal(after.labels, before.labels)
    np.testing.assert_array_equal(after.numeric, before.numeric)  # NaN == NaN here
    assert after.genomics is not None and before.genomics is not None
    np.testing.assert_array_equal(after.genomics, before.genomics)
    alcohol = after.categorical[after.categorical_cols.index("alcohol")]
    assert alcohol[0] == "moderate, weekends only" and alcohol[1] == 'said "none"'
    assert alcohol[2:] == before.categorical[before.categorical_cols.index("alcohol")][2:]


def test_ids_keep_leading_zeros(site: Path) -> None:
    old = "0100002"
    rows = read_rows(site / "records.csv")
    assert rows[2][0] == old
    rows[2][0] = "01005"
    write_rows(site / "records.csv", rows)
    grows = read_rows(site / "genomics.csv")
    for row in grows:
        if row[0] == old:
            row[0] = "01005"
    write_rows(site / "genomics.csv", grows)
    image = site / "images" / f"{old}.png"
    if image.exists():
        image.rename(site / "images" / "01005.png")

    result = read_site(site)
    assert result.ok, result.problems
    assert result.site is not None
    ids = result.site.ids
    assert ids[0] == "0100001" and ids[1] == "01005"
    assert all(isinstance(i, str) and i.startswith("0") for i in ids)
    assert result.site.image_mask[1] == image.parent.joinpath("01005.png").exists()
    assert result.site.genomics_mask[1] == any(r[0] == "01005" for r in grows)


def test_missing_clinical_values_warn_but_load(site: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Gaps are warnings, not problems: the model imputes them (with a missing indicator).

    Missing numeric cells become NaN in ``site.numeric`` (and only there: labels are ints,
    absent images are zeros behind ``image_mask``); missing categorical cells become None.
    """
    records = site / "records.csv"
    rows = read_rows(records)
    ages = [r[rows[0].index("age")] for r in rows[3:]]
    age_gaps = 2 + sum(a in MISSING_MARKERS for a in ages)  # 0 extra in the synthetic cohort
    set_cell(records, "0100001", "age", "")
    set_cell(records, "0100002", "age", "NA")
    set_cell(records, "0100003", "sex", "")
    code, out, err = check(site, capsys)
    assert code == 0, out + err
    assert out.startswith("ok: ")
    assert (f"warning: records.csv: column 'age' has {age_gaps} missing value(s) of 40 "
            "(imputed" in err)
    assert "column 'sex' has 1 missing value(s) of 40" in err

    result = read_site(site)
    assert result.site is not None
    data = result.site
    rows = read_rows(records)
    header = rows[0]
    # one warning per column with gaps, with the exact count of gaps in that column
    for col in data.numeric_cols + data.categorical_cols:
        gaps = sum(r[header.index(col)].strip() in MISSING_MARKERS for r in rows[1:])
        text = f"column '{col}' has {gaps} missing value(s) of {N}"
        assert (text in " ".join(result.warnings)) == (gaps > 0), col
    # NaN exactly where the CSV cell is a gap, nowhere else
    for k, col in enumerate(data.numeric_cols):
        gap = np.array([r[header.index(col)].strip() in MISSING_MARKERS for r in rows[1:]])
        np.testing.assert_array_equal(np.isnan(data.numeric[:, k]), gap, err_msg=col)
    age = data.numeric[:, data.numeric_cols.index("age")]
    assert np.isnan(age[:2]).all() and int(np.isnan(age).sum()) == age_gaps
    sex = data.categorical[data.categorical_cols.index("sex")]
    assert sex[2] is None and all(v in ("F", "M") for i, v in enumerate(sex) if i != 2)
    assert all(v is None or isinstance(v, str) for col in data.categorical for v in col)
    assert data.images is not None and np.isfinite(data.images).all()


# --------------------------------------------------------------------------- other formats


def test_npy_dicom_and_16bit_png_images_load(site: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pngs = sorted((site / "images").glob("*.png"))[:4]
    pids = [p.stem for p in pngs]
    for p in pngs:
        p.unlink()
    flat = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE) / 7.0
    np.save(site / "images" / f"{pids[0]}.npy", flat)
    np.save(site / "images" / f"{pids[1]}.npy", flat[None] * 2)  # (1, H, W) is accepted
    dicom = (np.arange(SIZE * SIZE) % 251).astype(np.uint8).reshape(SIZE, SIZE)
    save_dicom(site / "images" / f"{pids[2]}.dcm", dicom)
    wide = (np.arange(SIZE * SIZE, dtype=np.uint16) * 60).reshape(SIZE, SIZE)
    save_png(site / "images" / f"{pids[3]}.png", wide)  # mode I;16

    code, out, err = check(site, capsys)
    assert code == 0, out + err
    result = read_site(site)
    assert result.site is not None and result.site.images is not None
    data = result.site
    rows = [data.ids.index(p) for p in pids]
    assert data.image_mask[rows].all()
    assert data.images.shape == (N, 1, SIZE, SIZE) and data.images.dtype == np.float32
    np.testing.assert_array_equal(data.images[rows[0], 0], flat)
    np.testing.assert_array_equal(data.images[rows[1], 0], flat * 2)
    np.testing.assert_array_equal(data.images[rows[2], 0], dicom.astype(np.float32))
    np.testing.assert_array_equal(data.images[rows[3], 0], wide.astype(np.float32))


def test_genomics_parquet_loads_like_csv(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = read_site(site).site
    assert before is not None and before.genomics is not None
    frame = pd.read_csv(site / "genomics.csv", dtype={"patient_id": str})
    frame.loc[1, "GENE0002"] = np.nan  # a gap in parquet is a null, not text
    frame.to_parquet(site / "genomics.parquet", index=False)
    (site / "genomics.csv").unlink()

    code, out, err = check(site, capsys)
    assert code == 0, out + err
    assert "genomics (40 genes" in out
    assert "1 missing expression value(s)" in err
    after = read_site(site).site
    assert after is not None and after.genomics is not None
    assert after.genes == before.genes
    np.testing.assert_array_equal(after.genomics_mask, before.genomics_mask)
    row = after.ids.index(frame.loc[1, "patient_id"])
    expected = before.genomics.copy()
    expected[row, 1] = np.nan
    np.testing.assert_allclose(after.genomics, expected, rtol=1e-6)


def test_genomics_parquet_with_integer_ids_is_a_problem(site: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """Ids stored as numbers lost their leading zeros: they must not silently match."""
    frame = pd.read_csv(site / "genomics.csv", dtype={"patient_id": str})
    frame["patient_id"] = frame["patient_id"].astype(int)
    frame.to_parquet(site / "genomics.parquet", index=False)
    (site / "genomics.csv").unlink()
    code, out, err = check(site, capsys)
    problems = assert_clean_failure(code, out, err)
    assert len(problems) == 1 and "not in records.csv: '100001'" in problems[0], problems


def test_site_toml_round_trips_classes_with_leading_zeros(tmp_path: Path) -> None:
    spec = SiteSpec(name="s", label="grade", classes=("01", "02", "-1", "10"),
                    modalities={"records": True, "images": False, "genomics": False},
                    image_size=None)
    write_site_spec(tmp_path / "site.toml", spec)
    parsed, problems = parse_site_spec(tmp_path / "site.toml")
    assert problems == [] and parsed is not None
    assert parsed.classes == spec.classes


def test_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(tmp_path / "nowhere", capsys)
    problems = assert_clean_failure(code, out, err)
    assert len(problems) == 1 and "not a directory" in problems[0]

