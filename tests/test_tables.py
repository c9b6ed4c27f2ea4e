"""The table layer of ``mmfed data import``, on real files as hospitals export them.

Each test writes the file a hospital would hand over (BOM, CRLF, semicolons, Parquet,
GCT, matrices either way round) and checks what the import would put in the site
folder, or that every problem is reported, one line each, with where to find it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfed.data.tables import read_genomics, read_records, read_table
from mmfed.errors import DataError


def write(path: Path, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def problems_of(call, *args) -> list[str]:
    with pytest.raises(DataError) as info:
        call(*args)
    problems = info.value.problems
    assert str(info.value) == problems[0]
    assert all("\n" not in p and "\r" not in p for p in problems)
    return problems


# --------------------------------------------------------------------------- read_table


@pytest.mark.parametrize("sep", [",", "\t", ";", "|"])
def test_delimited_text_with_bom_and_crlf(tmp_path, sep):
    rows = [["patient_id", " age ", "note"], ["01005", "45", "a, b"], ["P2", "", "x"]]
    body = "\n".join(sep.join(f'"{c}"' if sep in c else c for c in r) for r in rows) + "\n"
    frame = read_table(write(tmp_path / "export.txt", body, bom=True, crlf=True))
    assert list(frame.columns) == ["patient_id", "age", "note"]
    assert frame.to_dict("list") == {"patient_id": ["01005", "P2"], "age": ["45", ""],
                                     "note": ["a, b", "x"]}


def test_semicolon_export_with_decimal_commas(tmp_path):
    frame = read_table(write(tmp_path / "eu.csv", "id;weight\nP1;70,5\nP2;81,25\n"))
    assert frame["weight"].tolist() == ["70,5", "81,25"]


def test_single_column_and_quoted_notes_spanning_lines(tmp_path):
    assert read_table(write(tmp_path / "one.csv", "id\nP1\nP2\n"))["id"].tolist() == [
        "P1", "P2"]
    frame = read_table(write(tmp_path / "notes.tsv", 'id\tnote\nP1\t"two\nlines"\nP2\tok\n'))
    assert frame["note"].tolist() == ["two\nlines", "ok"]


def test_parquet_cells_become_text(tmp_path):
    path = tmp_path / "records.parquet"
    pd.DataFrame({"id": ["01005", "00007"], "n": [3, None],
                  "x": [1.5, float("nan")]}).to_parquet(path)
    frame = read_table(path)
    assert frame.to_dict("list") == {"id": ["01005", "00007"], "n": ["3", ""],
                                     "x": ["1.5", ""]}


@pytest.mark.parametrize(("content", "expected"), [
    (b"a,b\n1,2\x00\n", "binary content"),
    (b"PK\x03\x04rest", "export it as CSV"),
    (b"id,label\nP1,caf\xe9\n", "not UTF-8 text (byte 15)"),
    (b"\xef\xbb\xbfid\n\xff\n", "not UTF-8 text (byte 6)"),
    (b"  \r\n\n", "empty file"),
    (b"a,b,c\n1,2,3\n4,5\n6,7,8,9\n", "line 3 has 2 fields, line 4 has 4 fields"),
    (b"a,,c\n1,2,3\n", "empty column name (column 2)"),
    (b"a,b, a\n1,2,3\n", "duplicate column names in header: 'a'"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "export.csv"
    path.write_bytes(content)
    (problem,) = problems_of(read_table, path)
    assert problem.startswith("export.csv: ")
    assert expected in problem
    assert str(tmp_path) not in problem


def test_unreadable_and_corrupt_files(tmp_path):
    (missing,) = problems_of(read_table, tmp_path / "absent.csv")
    assert missing.startswith("absent.csv: cannot be read")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (corrupt,) = problems_of(read_table, tmp_path / "broken.parquet")
    assert corrupt.startswith("broken.parquet: unreadable Parquet file")


# --------------------------------------------------------------------------- read_records


def test_records_renamed_and_leading_zeros_kept(tmp_path):
    path = write(tmp_path / "ehr.csv",
                 "mrn,age,outcome,site\n01005,45,yes,A\n00007,61,no,B\n", bom=True, crlf=True)
    rec = read_records(path, "mrn", "outcome", None)
    assert list(rec.frame.columns) == ["patient_id", "label", "age", "site"]
    assert rec.frame["patient_id"].tolist() == ["01005", "00007"]
    assert rec.frame["label"].tolist() == ["yes", "no"]
    assert rec.classes == ["no", "yes"]
    assert rec.warnings == []
    assert rec.dropped_no_label == 0


def test_parquet_records_with_integer_labels(tmp_path):
    path = tmp_path / "ehr.parquet"
    pd.DataFrame({"id": ["01005", "01006", "01007"], "y": [1.0, 0.0, 1.0],
                  "bmi": [21.5, None, 30.0]}).to_parquet(path)
    rec = read_records(path, "id", "y", None)
    assert rec.frame["patient_id"].tolist() == ["01005", "01006", "01007"]
    assert rec.classes == ["0", "1"]
    assert rec.frame["label"].tolist() == ["1", "0", "1"]
    assert rec.frame["bmi"].tolist() == ["21.5", "", "30"]


def test_float_labels_are_integer_classes(tmp_path):
    path = write(tmp_path / "ehr.csv", "id,y\nP1,1.0\nP2, 0.0\nP3,1\n")
    rec = read_records(path, "id", "y", None)
    assert rec.classes == ["0", "1"]
    assert rec.frame["label"].tolist() == ["1", "0", "1"]
    given = read_records(path, "id", "y", ["0", "1"])
    assert given.frame["label"].tolist() == ["1", "0", "1"]


def test_integer_classes_sorted_numerically(tmp_path):
    path = write(tmp_path / "ehr.csv", "id,grade\nP1,10\nP2,2\nP3,1\nP4,2\n")
    assert read_records(path, "id", "grade", None).classes == ["1", "2", "10"]


def test_given_classes_keep_their_order_and_reject_other_values(tmp_path):
    path = write(tmp_path / "ehr.csv", "id,y\nP1,yes\nP2,no\nP3,maybe\nP4,yes\n")
    assert read_records(write(tmp_path / "ok.csv", "id,y\nP1,yes\nP2,no\n"), "id", "y",
                        ["yes", "no"]).classes == ["yes", "no"]
    (problem,) = problems_of(read_records, path, "id", "y", ["yes", "no"])
    assert "label outside --classes ['yes', 'no']" in problem
    assert "line 4 ('maybe')" in problem


def test_rows_without_a_label_are_dropped_with_a_warning(tmp_path):
    path = write(tmp_path / "ehr.csv", "id,y\nP1,yes\nP2,\nP3,NA\nP4,no\nP5, null \n")
    rec = read_records(path, "id", "y", None)
    assert rec.frame["patient_id"].tolist() == ["P1", "P4"]
    assert rec.dropped_no_label == 3
    assert rec.warnings == ["ehr.csv: 3 patients without a label in 'y' (dropped): "
                            "lines 3, 4, 6"]


def test_empty_spreadsheet_rows_are_ignored(tmp_path):
    path = write(tmp_path / "ehr.csv", "id,y,age\nP1,yes,4\nP2,no,5\n,,\n,,\n")
    rec = read_records(path, "id", "y", None)
    assert len(rec.frame) == 2
    assert rec.dropped_no_label == 0
    assert rec.warnings == ["ehr.csv: 2 empty rows ignored (every cell empty): lines 4, 5"]


def test_duplicate_and_bad_ids_all_reported_with_lines(tmp_path):
    path = write(tmp_path / "ehr.csv",
                 "id,y\nP1,yes\nP2,no\nP1,no\na/b,yes\n,no\nP2,yes\n P3,no\n")
    problems = problems_of(read_records, path, "id", "y", None)
    text = "\n".join(problems)
    assert "duplicate patient ids in 'id': 'P1' (lines 2, 4), 'P2' (lines 3, 7)" in text
    assert "missing patient id ('id' empty) at line 6" in text
    assert "patient id contains '/', '\\' or '..' at line 5 ('a/b')" in text
    assert "patient id has leading or trailing spaces at line 8 (' P3')" in text


def test_line_numbers_follow_notes_that_span_lines(tmp_path):
    path = write(tmp_path / "ehr.csv", 'id,note,y\nP1,"a\nb\nc",yes\nP2,x,no\nP3,y,perhaps\n')
    (problem,) = problems_of(read_records, path, "id", "y", ["yes", "no"])
    assert "at line 6 ('perhaps')" in problem  # not line 4: the note spans 3 lines


def test_missing_columns_listed(tmp_path):
    path = write(tmp_path / "ehr.csv", "MRN,age,sex,outcome\nP1,3,F,yes\n")
    problems = problems_of(read_records, path, "mrn", "death", None)
    assert problems[0] == ("ehr.csv: no id column 'mrn' (--id-column); columns: 'MRN', "
                           "'age', 'sex', 'outcome'; did you mean 'MRN'?")
    assert problems[1].startswith("ehr.csv: no label column 'death' (--label); columns: ")


def test_same_or_colliding_columns_rejected(tmp_path):
    path = write(tmp_path / "ehr.csv", "mrn,label,outcome\nP1,x,yes\nP2,y,no\n")
    (same, *_) = problems_of(read_records, path, "mrn", "mrn", None)
    assert "--id-column and --label name the same column 'mrn'" in same
    (collide,) = problems_of(read_records, path, "mrn", "outcome", None)
    assert "column 'label' would collide with the label column" in collide


def test_one_class_or_no_patients_rejected(tmp_path):
    one = write(tmp_path / "one.csv", "id,y\nP1,yes\nP2,yes\nP3,\n")
    (problem,) = problems_of(read_records, one, "id", "y", None)
    assert "every patient has the label 'yes'" in problem
    none = write(tmp_path / "none.csv", "id,y\n")
    (problem,) = problems_of(read_records, none, "id", "y", None)
    assert problem == "none.csv: no patients (the file has no rows)"
    few = problems_of(read_records, write(tmp_path / "a.csv", "id,y\nP1,1\nP2,0\n"),
                      "id", "y", ["1"])
    assert few[0] == "--classes 1: give at least 2 classes"
    # A small site that saw one outcome only still imports under the federation's classes.
    rec = read_records(one, "id", "y", ["no", "yes"])
    assert rec.classes == ["no", "yes"] and rec.frame["label"].tolist() == ["yes", "yes"]
    assert any("without patients" in w for w in rec.warnings)


# --------------------------------------------------------------------------- read_genomics


RECORD_IDS = ["P1", "P2", "P3"]


def test_samples_by_genes_csv(tmp_path):
    path = write(tmp_path / "expr.csv", "sample,TP53,EGFR\nP1,1.5,2\nX9,0,0\nP3,NA,-0.25\n",
                 bom=True, crlf=True)
    gen = read_genomics(path, RECORD_IDS)
    assert gen.orientation == "samples x genes"
    assert gen.frame.to_dict("list") == {"patient_id": ["P1", "P3"], "TP53": ["1.5", "NA"],
                                         "EGFR": ["2", "-0.25"]}
    assert (gen.matched, gen.unmatched_samples) == (2, 1)
    assert "expr.csv: 1 sample not in the records (not imported): 'X9'" in gen.warnings
    assert "expr.csv: 1 of 3 patients have no genomic profile" in gen.warnings


def test_genes_by_samples_tsv(tmp_path):
    path = write(tmp_path / "expr.tsv", "gene\tP3\tP1\tZ1\nTP53\t1\t2\t3\nEGFR\t4\t\t6\n")
    gen = read_genomics(path, RECORD_IDS)
    assert gen.orientation == "genes x samples"
    assert gen.frame.to_dict("list") == {"patient_id": ["P3", "P1"], "TP53": ["1", "2"],
                                         "EGFR": ["4", ""]}
    assert (gen.matched, gen.unmatched_samples) == (2, 1)


def test_r_style_matrix_without_corner_name(tmp_path):
    short = write(tmp_path / "r.tsv", "P1\tP2\nTP53\t1\t2\nEGFR\t3\t4\n")
    assert read_genomics(short, RECORD_IDS).frame["EGFR"].tolist() == ["3", "4"]
    blank = write(tmp_path / "pandas.csv", ",P1,P2\nTP53,1,2\n")
    assert read_genomics(blank, RECORD_IDS).frame["TP53"].tolist() == ["1", "2"]


def test_parquet_genomics(tmp_path):
    path = tmp_path / "expr.parquet"
    pd.DataFrame({"id": ["P2", "P1"], "TP53": [0.5, np.nan],
                  "EGFR": [1.0, 2.25]}).to_parquet(path)
    gen = read_genomics(path, RECORD_IDS)
    assert gen.orientation == "samples x genes"
    assert gen.frame.to_dict("list") == {"patient_id": ["P2", "P1"], "TP53": ["0.5", ""],
                                         "EGFR": ["1", "2.25"]}


def test_gct(tmp_path):
    text = "#1.2\n2\t3\nName\tDescription\tP1\tP2\tQ7\nTP53\ttumour p53\t1\t2\t3\nEGFR\t\t4\t5\t6\n"
    path = write(tmp_path / "expr.gct", text, crlf=True)
    gen = read_genomics(path, RECORD_IDS)
    assert gen.orientation == "gct"
    assert gen.frame.to_dict("list") == {"patient_id": ["P1", "P2"], "TP53": ["1", "2"],
                                         "EGFR": ["4", "5"]}
    assert gen.unmatched_samples == 1
    assert list(read_table(path).columns) == ["Name", "P1", "P2", "Q7"]
    bad = write(tmp_path / "bad.gct", text.replace("2\t3", "5\t3"))
    (problem,) = problems_of(read_genomics, bad, RECORD_IDS)
    assert "line 2 says 5 genes x 3 samples, the file has 2 x 3" in problem


def test_orientation_follows_the_matching_ids(tmp_path):
    # Both the first column and the header look like ids; only the header matches more.
    path = write(tmp_path / "expr.csv", "id,P1,P2,P3\nP1,1,2,3\nG2,4,5,6\nG3,7,8,9\n")
    gen = read_genomics(path, RECORD_IDS)
    assert gen.orientation == "genes x samples"
    assert list(gen.frame.columns) == ["patient_id", "P1", "G2", "G3"]
    assert gen.frame["patient_id"].tolist() == ["P1", "P2", "P3"]


def test_no_matching_ids_shows_both_sides(tmp_path):
    path = write(tmp_path / "expr.csv", "id,TP53,EGFR\n1,1,2\n2,3,4\n")
    (problem,) = problems_of(read_genomics, path, ["01", "02"])
    assert problem.startswith("expr.csv: no sample ids match the records")
    assert "first-column ids, e.g. '1', '2'" in problem
    assert "header ids, e.g. 'TP53', 'EGFR'" in problem
    assert "record ids, e.g. '01', '02'" in problem
    assert "leading zeros" in problem


def test_duplicate_gene_and_sample_ids_reported(tmp_path):
    path = write(tmp_path / "expr.tsv",
                 "gene\tP1\tP2\nTP53\t1\t2\nTP53\t1\t2\nMYC\t0\t0\nMYC\t0\t0\nMYC\t1\t1\n")
    (problem,) = problems_of(read_genomics, path, RECORD_IDS)
    assert problem == "expr.tsv: duplicate gene ids: TP53 (2x), MYC (3x)"
    wide = write(tmp_path / "wide.csv", "id,TP53,TP53,EGFR\nP1,1,2,3\nP1,4,5,6\n")
    problems = problems_of(read_genomics, wide, RECORD_IDS)
    assert problems == ["wide.csv: duplicate gene ids: TP53 (2x)",
                        "wide.csv: duplicate sample ids: 'P1' (2x)"]


def test_non_numeric_expression_cells_named(tmp_path):
    path = write(tmp_path / "expr.csv",
                 "id,TP53,EGFR\nP1,1.5,high\nP2, 2 ,NaN\nP3,inf,3\nX1,junk,junk\n")
    (problem,) = problems_of(read_genomics, path, RECORD_IDS)
    assert problem == ("expr.csv: 2 expression values neither a number (within float32) "
                       "nor missing: (sample 'P1', gene 'EGFR') 'high', "
                       "(sample 'P3', gene 'TP53') 'inf'")


def test_wide_matrix_reads_fast(tmp_path):
    genes, samples = 5000, 300
    ids = [f"S{j:03d}" for j in range(samples)]
    values = np.random.default_rng(0).normal(size=(genes, samples)).round(3).astype(str)
    lines = ["gene," + ",".join(ids)]
    lines += [f"G{i}," + ",".join(row) for i, row in enumerate(values.tolist())]
    path = write(tmp_path / "wide.csv", "\n".join(lines) + "\n")
    start = time.perf_counter()
    gen = read_genomics(path, ids[::-1])
    elapsed = time.perf_counter() - start
    assert gen.frame.shape == (samples, genes + 1)
    assert gen.frame.iloc[7, 1 + 42] == values[42, 7]
    assert elapsed < 5.0


def test_parquet_problems_name_rows(tmp_path):
    path = tmp_path / "ehr.parquet"
    pd.DataFrame({"id": ["P1", "P1", "P2"], "y": ["a", "b", "a"]}).to_parquet(path)
    (problem,) = problems_of(read_records, path, "id", "y", None)
    assert problem == "ehr.parquet: duplicate patient ids in 'id': 'P1' (rows 1, 2)"


def test_malformed_matrix_rows_named_by_line(tmp_path):
    short = write(tmp_path / "r.tsv", "P1\tP2\nTP53\t1\t2\nEGFR\t4\nMYC\t1\t2\t3\t4\n")
    (problem,) = problems_of(read_genomics, short, RECORD_IDS)
    assert problem == ("r.tsv: malformed TSV: 2 row(s) with a different number of fields "
                       "than the first data row's 3: line 3 has 2 fields, line 4 has 5 fields")
    gct = write(tmp_path / "x.gct", "#1.2\n2\t2\nName\tDescription\tP1\tP2\nA\t\t1\nB\t\t3\t4\n")
    (problem,) = problems_of(read_genomics, gct, RECORD_IDS)
    assert problem.endswith("line 4 has 3 fields")
