"""How fast ``mmfed data import`` turns a PACS export into a site folder.

An export of ``--patients`` patients is built from pydicom's own test objects (read
from the installed package, never downloaded): per patient one 512×512 CT slice, in
the transfer syntax under test, with a fresh PatientID, in nested study/series folders
with meaningless file names. The whole import (walk, header read, content hash,
decode, modality LUT, resize to 64×64, write, check) is timed end to end, once with
one decoding process and once with ``--workers 2``, after one warm-up import that is
not counted. Last line: one JSON object with images per second per syntax.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from mmfed.data.importer import ImportSettings, import_site

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# 512×512 CT-sized objects per transfer syntax (JPEG 2000: a real 512×512 CT).
SOURCES = {
    "explicit VR little endian": None,  # made from CT_small, enlarged to 512×512
    "JPEG 2000": "693_J2KI.dcm",
}


def _uncompressed_512() -> pydicom.Dataset:
    ds = pydicom.dcmread(FILES / "CT_small.dcm")
    big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    return ds


def build(root: Path, syntax: str, patients: int) -> Path:
    src = SOURCES[syntax]
    base = _uncompressed_512() if src is None else pydicom.dcmread(FILES / src)
    export = root / "export"
    ids = []
    for i in range(patients):
        pid = f"P{i:05d}"
        ids.append(pid)
        base.PatientID = pid
        folder = export / f"STUDY{i % 7}" / f"SERIES{i}"
        folder.mkdir(parents=True, exist_ok=True)
        base.save_as(folder / f"IM{i:06d}", enforce_file_format=True)
    records = root / "records.csv"
    records.write_text("mrn,outcome,age\n" + "".join(
        f"{pid},{'yes' if i % 2 else 'no'},{40 + i % 30}\n" for i, pid in enumerate(ids)),
        encoding="utf-8")
    return export


def timed_import(root: Path, export: Path, workers: int, tag: str) -> float:
    out = root / f"site-{tag}"
    start = time.perf_counter()
    result = import_site(ImportSettings(out=out, name="site-1", records=root / "records.csv",
                                        id_column="mrn", label="outcome", images=export,
                                        workers=workers, force=True))
    seconds = time.perf_counter() - start
    if result.images == 0:
        raise SystemExit("import produced no images")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    for syntax in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            export = build(root, syntax, args.patients)
            timed_import(root, export, 1, "warm")
            cell: dict[str, float] = {}
            for workers in (1, 2):
                runs = [timed_import(root, export, workers, f"w{workers}")
                        for _ in range(args.repeats)]
                cell[f"images_per_s_workers_{workers}"] = round(
                    args.patients / statistics.median(runs), 1)
            cell["speedup_2_workers"] = round(cell["images_per_s_workers_2"]
                                              / cell["images_per_s_workers_1"], 3)
            figures[syntax] = cell
            print(f"{syntax}: {cell}", flush=True)
    print(json.dumps({"patients": args.patients, "image_size": [64, 64],
                      "source_size": [512, 512], "syntaxes": figures}))


if __name__ == "__main__":
    main()
