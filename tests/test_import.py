"""`mmfed data import`, end to end through the command line, on real files.

Exports are built in temporary folders from real DICOM objects (pydicom's own test
files, read from the installed package) and from a synthetic cohort written out the way a
hospital holds it: an EHR extract keyed by MRN with a text outcome, a PACS export of
DICOM files with meaningless names in nested folders (some named after patients), and a
genes × samples expression matrix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from mmfed.ml.process import quiet_env
from tests.dicom_exports import build_export
from tests.helpers import MMFED, run_mmfed


def _tree_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


def _assert_no_phi(site: Path, planted: list[str]) -> None:
    """No planted identifier in any file name or byte of the site folder (the .npy files
    included), in the text encodings a header value could travel in."""
    assert planted
    for path, data in _tree_bytes(site):
        name = str(path.relative_to(site))
        for value in planted:
            for form in {value, value.replace("^", " "), value.replace("^", "_")}:
                assert form not in name, (form, name)
                for enc in ("utf-8", "utf-16-le"):
                    assert form.encode(enc) not in data, (form, name)


def _records_for(ids: list[str], path: Path, sep: str = ",") -> None:
    rows = [f"{pid}{sep}{'yes' if i % 2 else 'no'}{sep}{50 + i}" for i, pid in enumerate(ids)]
    path.write_text(f"MRN{sep}relapse{sep}age\r\n" + "\r\n".join(rows) + "\r\n",
                    encoding="utf-8-sig")


@pytest.mark.parametrize("layout", ["nested", "flat", "dicomdir-like"])
def test_pacs_export_imports_in_one_command(tmp_path: Path, layout: str) -> None:
    export = tmp_path / "export"
    manifest = build_export(export, layout=layout)
    records = tmp_path / "ehr.csv"
    _records_for(manifest["record_patients"], records, sep=";" if layout == "flat" else ",")
    site = tmp_path / "site"
    proc = run_mmfed("data", "import", "--out", site, "--name", "st-mary", "--records",
                     records, "--id-column", "MRN", "--label", "relapse", "--images", export,
                     timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((site / "import.json").read_text())

    # Every decodable patient gets exactly one image, under the records' id.
    expected = set(manifest["image_patients"])
    written = {p.stem for p in (site / "images").iterdir()}
    assert written == expected
    for pid in manifest["record_patients"]:
        entry = report["patients"][pid]["image"]
        assert (entry is not None) == (pid in expected)
        if entry is not None:
            assert entry["kind"] == manifest["kinds"][pid]
            assert entry["transforms"] is not None and entry["rule"]
    # Every transfer syntax real archives use decoded (pixels from pydicom's own objects).
    decoded = set(report["images"]["imported_by_encoding"])
    assert {"Explicit VR Little Endian", "Implicit VR Little Endian", "Explicit VR Big Endian",
            "Deflated Explicit VR Little Endian", "RLE Lossless", "JPEG Baseline (Process 1)",
            "JPEG Extended (Process 2 and 4)", "JPEG-LS Lossless Image Compression",
            "JPEG 2000 Image Compression", "PNG", "TIFF"} <= decoded, decoded
    assert any(d.startswith("JPEG Lossless") for d in decoded), decoded
    # A patient whose every file is unusable is imported without an image, and counted.
    assert report["images"]["patients_without_image"] == len(manifest["no_image_patients"])
    assert f"{len(manifest['no_image_patients'])} without" in proc.stdout
    # The export's absent patient is counted, not imported.
    assert report["images"]["absent_from_records"]["patients"] == len(manifest["absent_ids"])
    for pid in manifest["absent_ids"]:
        assert pid not in (site / "import.json").read_text()
    # Every skipped file is listed with its reason, found again by its content hash.
    import hashlib

    by_hash = {e["sha256"]: e["reason"] for e in report["skipped"]}
    for rel, categories in manifest["skips"].items():
        digest = hashlib.sha256((export / rel).read_bytes()).hexdigest()
        assert digest in by_hash, rel
        assert by_hash[digest].startswith(tuple(categories)), (rel, by_hash[digest])
    skipped_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped:")]
    assert len(skipped_lines) >= len(manifest["skips"])

    # Nothing identifying left the headers or the folder names.
    _assert_no_phi(site, manifest["phi_strings"])
    check = run_mmfed("data", "check", site)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"images ({len(expected)}/{len(manifest['record_patients'])} patients)" in check.stdout


def test_import_is_atomic_and_never_overwrites_by_accident(tmp_path: Path) -> None:
    export = tmp_path / "export"
    manifest = build_export(export, layout="flat")
    records = tmp_path / "ehr.csv"
    _records_for(manifest["record_patients"], records)
    site = tmp_path / "site"
    base = ["data", "import", "--out", site, "--name", "s1", "--records", records,
            "--id-column", "MRN", "--label", "relapse", "--images", export]

    # Bad records: every problem listed, nothing written.
    bad = tmp_path / "bad.csv"
    bad.write_text("MRN,relapse\nA1,yes\nA1,no\n../x,yes\n", encoding="utf-8")
    proc = run_mmfed(*[bad if a == records else a for a in base])
    assert proc.returncode == 1
    assert not site.exists() and not list(tmp_path.glob(".site.*"))
    problems = [ln for ln in proc.stdout.splitlines() if ln.startswith("problem:")]
    assert any("duplicate" in p for p in problems) and any("'..'" in p for p in problems)
    assert "Traceback" not in proc.stderr

    # A wrong id column names the columns there are.
    proc = run_mmfed(*[("PatientNo" if a == "MRN" else a) for a in base])
    assert proc.returncode == 1 and "MRN" in proc.stdout and not site.exists()

    assert run_mmfed(*base).returncode == 0
    before = _tree_bytes(site)
    proc = run_mmfed(*base)  # exists, no --force
    assert proc.returncode == 1 and "--force" in proc.stdout
    assert _tree_bytes(site) == before

    # --force replaces a site folder, never some other folder.
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    proc = run_mmfed(*[other if a == site else a for a in base], "--force")
    assert proc.returncode == 1 and "not a site folder" in proc.stdout
    assert (other / "chapter1.tex").read_text() == "precious"
    # Nor may the site folder land inside the export it reads.
    proc = run_mmfed(*[export / "out" if a == site else a for a in base])
    assert proc.returncode == 2 and "overlaps" in proc.stderr

    # A failing --force import keeps the old site folder as it was.
    proc = run_mmfed(*[bad if a == records else a for a in base], "--force")
    assert proc.returncode == 1 and _tree_bytes(site) == before
    assert run_mmfed(*base, "--force").returncode == 0


def test_killed_import_leaves_no_site_folder(tmp_path: Path) -> None:
    """SIGKILL while pixels are being written: no SITE, and the next import removes the
    hidden work folder the killed one left."""
    export = tmp_path / "export"
    src = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files"
                          / "CT_small.dcm")
    ids = [f"K{i:04d}" for i in range(400)]
    for i, pid in enumerate(ids):
        src.PatientID = pid
        (export / f"S{i % 9}").mkdir(parents=True, exist_ok=True)
        src.save_as(export / f"S{i % 9}" / f"IM{i:05d}")
    records = tmp_path / "ehr.csv"
    _records_for(ids, records)
    site = tmp_path / "site"
    cmd = [*MMFED, "data", "import", "--out", str(site), "--name", "s1", "--records",
           str(records), "--id-column", "MRN", "--label", "relapse", "--images", str(export),
           "--image-size", "256", "256", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".site.import-*/images/*.npy")):
        assert proc.poll() is None, "import finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not site.exists()
    assert list(tmp_path.glob(".site.import-*"))  # the killed import's work folder
    done = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".site.import-*"))
    assert len(list((site / "images").iterdir())) == len(ids)


def test_identifying_record_columns_are_refused_unless_dropped(tmp_path: Path) -> None:
    records = tmp_path / "ehr.tsv"
    records.write_text("mrn\tPatient Name\tdate_of_birth\tstage\toutcome\n"
                       "007\tDOE^JOHN\t1950-01-01\tII\t1\n"
                       "008\tROE^JANE\t1960-02-02\tIII\t0\n"
                       "009\tPOE^EDGAR\t1970-03-03\tI\t1\n", encoding="utf-8")
    site = tmp_path / "site"
    base = ["data", "import", "--out", site, "--name", "s1", "--records", records,
            "--id-column", "mrn", "--label", "outcome"]
    proc = run_mmfed(*base)
    assert proc.returncode == 1 and "Patient Name" in proc.stdout and "--drop" in proc.stdout
    assert not site.exists()
    proc = run_mmfed(*base, "--drop", "Patient Name,date_of_birth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    frame = pd.read_csv(site / "records.csv", dtype=str)
    assert list(frame.columns) == ["patient_id", "label", "stage"]
    assert frame["patient_id"].tolist() == ["007", "008", "009"]  # zeros kept
    _assert_no_phi(site, ["DOE^JOHN", "ROE^JANE", "1950-01-01"])


def _equal_rgb(path: Path, gray: np.ndarray) -> None:
    Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB").save(path)


def test_data_check_reads_equal_channel_colour_and_refuses_real_colour(
        tmp_path: Path) -> None:
    site = tmp_path / "fed"
    assert run_mmfed("data", "synth", "--out", site, "--sites", "1", "--patients-per-site",
                     "20", "--holdout", "20", "--genes", "20").returncode == 0
    folder = site / "site-1"
    png = sorted((folder / "images").glob("*.png"))
    gray = np.asarray(Image.open(png[0]))
    _equal_rgb(png[0], gray)
    # A DICOM secondary capture stored as RGB with equal channels, too.
    pid = png[1].stem
    gray1 = np.asarray(Image.open(png[1]))
    png[1].unlink()
    _write_dicom(folder / "images" / f"{pid}.dcm", pid, np.stack([gray1] * 3, axis=-1))
    proc = run_mmfed("data", "check", folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal channels" in proc.stderr

    rgb = np.stack([gray, gray, 255 - gray], axis=-1)
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(png[0])
    proc = run_mmfed("data", "check", folder)
    assert proc.returncode == 1 and "colour" in proc.stdout and "mmfed data import" in proc.stdout

    Image.fromarray(np.zeros((32, 48), dtype=np.uint8)).save(png[0])
    proc = run_mmfed("data", "check", folder)
    assert proc.returncode == 1 and "mmfed data import --image-size 64 64" in proc.stdout


def _write_dicom(path: Path, pid: str, pixels: np.ndarray, syntax: str = ExplicitVRLittleEndian,
                 name: str = "") -> None:
    """A secondary-capture DICOM object as a scanner console exports it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = pid
    ds.PatientName = name or "ANON"
    ds.PatientBirthDate = "19480101"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)


def _as_hospital_export(site: Path, out: Path, names: dict[str, str]) -> dict[str, Path]:
    """A synthetic site folder rewritten the way a hospital holds it."""
    out.mkdir(parents=True)
    rec = pd.read_csv(site / "records.csv", dtype=str)
    rec = rec.rename(columns={"patient_id": "MRN", "label": "relapse"})
    rec["relapse"] = rec["relapse"].map({"0": "no", "1": "yes"})
    rec = rec[["relapse"] + [c for c in rec.columns if c != "relapse"]]  # id not first
    rec.to_csv(out / "ehr.tsv", sep="\t", index=False, lineterminator="\r\n")
    syntaxes = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless]
    for k, png in enumerate(sorted((site / "images").glob("*.png"))):
        pid = png.stem
        pixels = np.asarray(Image.open(png)).astype(np.uint16)
        big = np.kron(pixels, np.ones((2, 2), dtype=np.uint16))  # 128x128, the import halves
        folder = out / "pacs" / f"{names[pid]}" / "STUDY1" / f"SERIES{k % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_dicom(folder / f"IM{k:06d}", pid, big, syntaxes[k % len(syntaxes)],
                     name=names[pid])
    gen = pd.read_csv(site / "genomics.csv", dtype=str).set_index("patient_id")
    gen.T.rename_axis("gene").to_csv(out / "expression.tsv", sep="\t")  # genes x samples
    return {"records": out / "ehr.tsv", "images": out / "pacs",
            "genomics": out / "expression.tsv"}


def test_federation_trains_on_three_imported_sites(tmp_path: Path) -> None:
    synth = tmp_path / "synth"
    assert run_mmfed("data", "synth", "--out", synth, "--sites", "3", "--patients-per-site",
                     "60", "--holdout", "60", "--genes", "40", "--seed", "3").returncode == 0
    fed = tmp_path / "fed"
    planted: list[str] = []
    for folder in ["site-1", "site-2", "site-3", "holdout"]:
        ids = pd.read_csv(synth / folder / "records.csv", dtype=str)["patient_id"].tolist()
        names = {pid: f"SMITH^PAT{chr(65 + i % 26)}{chr(65 + i // 26 % 26)}"
                 for i, pid in enumerate(ids)}
        planted += list(names.values())[:20]
        export = _as_hospital_export(synth / folder, tmp_path / "exports" / folder, names)
        proc = run_mmfed("data", "import", "--out", fed / folder, "--name", folder,
                         "--records", export["records"], "--id-column", "MRN", "--label",
                         "relapse", "--classes", "no,yes", "--images", export["images"],
                         "--genomics", export["genomics"], timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        _assert_no_phi(fed / folder, [*planted[-20:], "19480101"])
        # Lossless syntaxes and an exact 2x2 box resize give the original pixels back.
        pid = sorted(p.stem for p in (synth / folder / "images").glob("*.png"))[0]
        original = np.asarray(Image.open(synth / folder / "images" / f"{pid}.png"))
        np.testing.assert_allclose(np.load(fed / folder / "images" / f"{pid}.npy"),
                                   original.astype(np.float32), atol=1e-3)
        gen = pd.read_csv(fed / folder / "genomics.csv", dtype=str)
        assert gen.columns[0] == "patient_id" and len(gen.columns) == 41
    run = tmp_path / "run"
    proc = run_mmfed("simulate", "--data", fed, "--rounds", "1", "--seed", "0", "--out", run,
                     "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["aggregation"]["participants"] == 3
    assert all(s["status"] == "trained" for s in metrics[-1]["sites"].values())
    assert 0.0 <= metrics[-1]["global"]["auroc"] <= 1.0


def test_import_help_and_usage_errors(tmp_path: Path) -> None:
    proc = run_mmfed("data", "import", "--help")
    assert proc.returncode == 0 and "--id-column" in proc.stdout and "--image-size" in proc.stdout
    proc = run_mmfed("data", "import", "--out", tmp_path / "s", "--name", "s1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) <= 2
    records = tmp_path / "r.csv"
    _records_for(["a1", "a2"], records)
    proc = run_mmfed("data", "import", "--out", tmp_path / "s", "--name", "bad name!",
                     "--records", records, "--id-column", "MRN", "--label", "relapse")
    assert proc.returncode == 2 and "--name" in proc.stderr
    proc = run_mmfed("data", "import", "--out", tmp_path / "s", "--name", "s1", "--records",
                     records, "--id-column", "MRN", "--label", "relapse", "--images",
                     tmp_path / "nowhere")
    assert proc.returncode == 1 and "no such folder" in proc.stdout
    assert not (tmp_path / "s").exists()
