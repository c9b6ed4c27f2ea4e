"""The site's audit trail: a valid chain verifies, and every kind of tampering is named.

Every test works on real files: the point is what an edit on disk (by hand, by a tool,
by a crash) does to verification, and that several processes appending to one folder
still leave one valid chain.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mmfed.errors import DataError
from mmfed.privacy.audit import GENESIS, HEAD_NAME, LOG_NAME, AuditLog, verify
from mmfed.privacy.ledger import PrivacyLedger, site_fingerprint
from mmfed.privacy.report import show_ledger
from tests.helpers import run_mmfed

APP = "ab" * 32


def _trail(folder: Path, n: int = 5) -> AuditLog:
    log = AuditLog(folder)
    log.append("started", site="site-1", pid=os.getpid())
    for i in range(1, n - 1):
        log.served("train", "run-1", i, APP, "site-1")
    log.refused("train", "run-1", n - 1, APP, "budget spent (épsilon 8)", "site-1")
    return log


def _lines(folder: Path) -> list[bytes]:
    return (folder / LOG_NAME).read_bytes().splitlines(keepends=True)


def _rewrite(folder: Path, lines: list[bytes]) -> None:
    (folder / LOG_NAME).write_bytes(b"".join(lines))  # keeps the file's mode


def _problems(folder: Path) -> str:
    report = verify(folder)
    assert not report.ok
    return "\n".join(report.problems)


def test_a_chain_verifies_and_follows_the_documented_hash(tmp_path: Path) -> None:
    folder = tmp_path / "privacy"
    _trail(folder, 5)
    report = verify(folder)
    assert report.ok, report.problems
    assert report.warnings == []
    assert report.entries == 5
    assert report.counts == {"refused": 1, "served": 3, "started": 1}
    assert report.head_seq == 4
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / LOG_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / HEAD_NAME).stat().st_mode) == 0o600

    entries = [json.loads(line) for line in _lines(folder)]
    assert [e["seq"] for e in entries] == list(range(5))
    assert report.first_time == entries[0]["time"] and report.last_time == entries[-1]["time"]
    assert entries[0]["time"].endswith("+00:00")
    prev = GENESIS
    for entry in entries:  # the hash spelled out independently of the module
        body = {k: v for k, v in entry.items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        assert entry["prev"] == prev
        assert entry["hash"] == hashlib.sha256((prev + text).encode()).hexdigest()
        prev = entry["hash"]
    assert report.head_hash == prev
    assert entries[-1]["reason"] == "budget spent (épsilon 8)"
    assert entries[1]["request"] == "train" and entries[1]["app_hash"] == APP


def test_an_edited_value_is_named_by_line_and_seq(tmp_path: Path) -> None:
    _trail(tmp_path, 5)
    lines = _lines(tmp_path)
    lines[2] = lines[2].replace(b'"round":2', b'"round":7')
    _rewrite(tmp_path, lines)
    assert _problems(tmp_path) == "line 3 (seq 2): hash mismatch (entry edited)"


def test_a_replaced_entry_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    _trail(tmp_path, 5)
    lines = _lines(tmp_path)
    forged = json.loads(lines[1])
    forged["request"] = "evaluate"
    body = {k: v for k, v in forged.items() if k != "hash"}
    forged["hash"] = hashlib.sha256(
        (forged["prev"] + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
    ).hexdigest()
    lines[1] = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    _rewrite(tmp_path, lines)
    assert "line 3 (seq 2): prev does not match the hash of seq 1" in _problems(tmp_path)


@pytest.mark.parametrize("mask", [0x01, 0x20, 0x10])
def test_any_one_edited_byte_is_detected(tmp_path: Path, mask: int) -> None:
    """Every position, including the hashes, the keys, the separators, the ends of line
    and the \\u escape of a non-ASCII reason (whose letter case does not change the
    parsed value)."""
    _trail(tmp_path, 4)
    original = (tmp_path / LOG_NAME).read_bytes()
    assert b"\\u00e9" in original
    missed = []
    fd = os.open(tmp_path / LOG_NAME, os.O_WRONLY)  # edit in place: one open, not 1000
    try:
        for i in range(len(original)):
            os.pwrite(fd, bytes([original[i] ^ mask]), i)
            if verify(tmp_path).ok:
                missed.append((i, original[max(0, i - 10):i + 10]))
            os.pwrite(fd, original[i:i + 1], i)
    finally:
        os.close(fd)
    assert missed == []
    assert verify(tmp_path).ok  # the file is back as it was


def test_flipped_bytes_in_the_hash_and_in_a_key_are_named(tmp_path: Path) -> None:
    _trail(tmp_path, 4)
    lines = _lines(tmp_path)
    at = lines[1].index(b'"hash":"') + 20
    lines[1] = lines[1][:at] + (b"0" if lines[1][at:at + 1] != b"0" else b"1") + lines[1][at + 1:]
    _rewrite(tmp_path, lines)
    problems = _problems(tmp_path)
    assert "line 2 (seq 1): hash mismatch" in problems
    assert "line 3 (seq 2): prev does not match the hash of seq 1" in problems

    _trail(tmp_path / "key", 4)
    lines = _lines(tmp_path / "key")
    lines[2] = lines[2].replace(b'"site":', b'"sitf":')
    _rewrite(tmp_path / "key", lines)
    assert _problems(tmp_path / "key") == "line 3 (seq 2): hash mismatch (entry edited)"

    _trail(tmp_path / "hashkey", 4)
    lines = _lines(tmp_path / "hashkey")
    lines[0] = lines[0].replace(b'"hash":', b'"hasi":')
    _rewrite(tmp_path / "hashkey", lines)
    assert "line 1 (seq 0): missing or malformed hash" in _problems(tmp_path / "hashkey")


def test_a_line_that_is_not_json_or_cut_short_is_named(tmp_path: Path) -> None:
    _trail(tmp_path, 5)
    lines = _lines(tmp_path)
    lines[1] = b"this is not json\n"
    _rewrite(tmp_path, lines)
    assert "line 2: not a JSON object (edited?)" in _problems(tmp_path)

    lines[1] = b"[1, 2, 3]\n"
    _rewrite(tmp_path, lines)
    assert "line 2: not a JSON object (edited?)" in _problems(tmp_path)

    _trail(tmp_path / "cut", 3)
    raw = (tmp_path / "cut" / LOG_NAME).read_bytes()
    (tmp_path / "cut" / LOG_NAME).write_bytes(raw[:-40])
    problems = _problems(tmp_path / "cut")
    assert "line 3: incomplete" in problems and "line 3: not a JSON object" in problems


def test_a_huge_edited_seq_is_a_gap_not_a_hang(tmp_path: Path) -> None:
    _trail(tmp_path, 3)
    lines = _lines(tmp_path)
    lines[2] = lines[2].replace(b'"seq":2', b'"seq":' + str(10**15).encode())
    _rewrite(tmp_path, lines)
    problems = _problems(tmp_path)
    assert f"entries 2–{10**15 - 1} missing (deleted?)" in problems
    assert f"line 3 (seq {10**15}): hash mismatch" in problems


def test_binary_garbage_is_a_report_not_a_traceback(tmp_path: Path) -> None:
    _trail(tmp_path, 3)
    (tmp_path / LOG_NAME).write_bytes(bytes(range(256)) * 4 + b"\xff\xfe{\n[[[[" * 10000)
    (tmp_path / HEAD_NAME).write_bytes(b"\x00\x01")
    report = verify(tmp_path)
    assert not report.ok
    assert f"{HEAD_NAME}: not a valid head record (edited?)" in report.problems


@pytest.mark.parametrize(("deleted", "named"), [([2], "entry 2 missing (deleted?)"),
                                                 ([2, 3], "entries 2–3 missing (deleted?)"),
                                                 ([0], "entry 0 missing (deleted?)")])
def test_deleted_middle_lines_are_a_named_gap(tmp_path: Path, deleted: list[int],
                                              named: str) -> None:
    _trail(tmp_path, 6)
    lines = _lines(tmp_path)
    _rewrite(tmp_path, [line for i, line in enumerate(lines) if i not in deleted])
    assert _problems(tmp_path) == named


def test_deleted_last_lines_are_seen_through_the_head(tmp_path: Path) -> None:
    _trail(tmp_path, 6)
    lines = _lines(tmp_path)
    _rewrite(tmp_path, lines[:-1])
    assert _problems(tmp_path) == (f"entry 5 missing at the end: {HEAD_NAME} records 6 "
                                   "entries, the log ends at seq 4 (truncated?)")
    _rewrite(tmp_path, lines[:-2])
    assert "entries 4–5 missing at the end" in _problems(tmp_path)
    _rewrite(tmp_path, [])
    assert "entries 0–5 missing at the end" in _problems(tmp_path)
    (tmp_path / LOG_NAME).unlink()
    assert f"{LOG_NAME} missing but {HEAD_NAME} records 6 entries" in _problems(tmp_path)


def test_swapped_lines_are_out_of_order(tmp_path: Path) -> None:
    _trail(tmp_path, 5)
    lines = _lines(tmp_path)
    lines[1], lines[3] = lines[3], lines[1]
    _rewrite(tmp_path, lines)
    problems = _problems(tmp_path)
    assert "line 3 (seq 2): out of order after seq 3 (reordered?)" in problems
    assert "line 4 (seq 1): out of order after seq 3 (reordered?)" in problems
    assert "missing" not in problems


def test_a_duplicated_line_is_named(tmp_path: Path) -> None:
    _trail(tmp_path, 4)
    lines = _lines(tmp_path)
    _rewrite(tmp_path, [*lines[:3], lines[2], lines[3]])
    assert "line 4 (seq 2): seq 2 already appears on line 3 (duplicated?)" in _problems(
        tmp_path)


def test_a_missing_or_edited_head_file_is_named(tmp_path: Path) -> None:
    _trail(tmp_path, 4)
    head = tmp_path / HEAD_NAME
    original = head.read_bytes()
    head.unlink()
    assert _problems(tmp_path) == (f"{HEAD_NAME} missing (deleted? the end of the log "
                                   "cannot be checked)")

    head.write_bytes(original)
    head.chmod(0o600)
    assert verify(tmp_path).ok
    head.write_bytes(original.replace(b'"seq":3', b'"seq":2'))
    assert _problems(tmp_path) == f"{HEAD_NAME}: not a valid head record (edited?)"
    head.write_bytes(original.replace(b'"seq":3', b'"seq":2').replace(b'"entries":4',
                                                                      b'"entries":3'))
    assert _problems(tmp_path) == (f"{HEAD_NAME} hash does not match entry 2 (head or "
                                   "entry edited?)")

    entry_hash = json.loads(original)["hash"]
    head.write_bytes(original.replace(entry_hash.encode(), b"f" * 64))
    assert _problems(tmp_path) == (f"{HEAD_NAME} hash does not match entry 3 (head or "
                                   "entry edited?)")

    head.write_bytes(original.replace(b":", b": "))  # same values, not as written
    assert _problems(tmp_path) == f"{HEAD_NAME}: not a valid head record (edited?)"

    head.write_bytes(original.replace(b'"entries":4', b'"entries":5'))
    assert _problems(tmp_path) == f"{HEAD_NAME}: not a valid head record (edited?)"


def test_any_one_edited_byte_of_the_head_is_detected(tmp_path: Path) -> None:
    _trail(tmp_path, 3)
    head = tmp_path / HEAD_NAME
    original = head.read_bytes()
    for mask in (0x01, 0x20):
        for i in range(len(original)):
            edited = bytearray(original)
            edited[i] ^= mask
            head.write_bytes(bytes(edited))
            assert not verify(tmp_path).ok, (mask, i, bytes(edited))
    head.write_bytes(original)
    assert verify(tmp_path).ok


def test_an_older_head_put_back_is_named_and_one_behind_is_a_warning(tmp_path: Path) -> None:
    log = _trail(tmp_path, 3)
    head = tmp_path / HEAD_NAME
    older = head.read_bytes()
    log.served("train", "run-1", 3, APP, "site-1")
    one_behind = head.read_bytes()
    log.served("train", "run-1", 4, APP, "site-1")

    head.write_bytes(one_behind)  # a crash between the last line and its head
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.warnings == [f"{HEAD_NAME} is one entry behind the log (a crash between "
                               "an append and its head update?)"]

    head.write_bytes(older)
    assert _problems(tmp_path) == (f"{HEAD_NAME} records seq 2 but the log goes on to seq "
                                   "4 (an older head put back?)")


def test_open_modes_are_problems(tmp_path: Path) -> None:
    folder = tmp_path / "privacy"
    _trail(folder, 3)
    (folder / LOG_NAME).chmod(0o644)
    assert _problems(folder) == (f"{LOG_NAME} has mode 0644: group or others can access "
                                 "it (expected 0600)")
    (folder / LOG_NAME).chmod(0o600)
    (folder / HEAD_NAME).chmod(0o640)
    assert f"{HEAD_NAME} has mode 0640" in _problems(folder)
    (folder / HEAD_NAME).chmod(0o600)
    folder.chmod(0o755)
    assert f"folder {folder} has mode 0755" in _problems(folder)
    folder.chmod(0o700)
    assert verify(folder).ok


def test_appends_after_damage_keep_the_evidence(tmp_path: Path) -> None:
    log = _trail(tmp_path, 5)
    lines = _lines(tmp_path)
    _rewrite(tmp_path, lines[:-2])  # cut off the end, then keep working
    entry = log.served("train", "run-1", 9, APP, "site-1")
    assert entry["seq"] == 5 and entry["prev"] == json.loads(lines[-1])["hash"]
    assert _problems(tmp_path) == "entries 3–4 missing (deleted?)"

    folder = tmp_path / "crashed"
    log = _trail(folder, 3)
    with open(folder / LOG_NAME, "ab") as fh:  # a write cut short by a crash
        fh.write(b'{"app_hash":"ab')
    entry = log.served("train", "run-1", 3, APP, "site-1")
    assert entry["seq"] == 3
    assert _lines(folder)[-1] == json.dumps(entry, sort_keys=True,
                                            separators=(",", ":")).encode() + b"\n"
    assert _problems(folder) == "line 4: not a JSON object (edited?)"


def test_append_refuses_fields_that_would_make_the_entry_lie(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    with pytest.raises(ValueError, match="seq"):
        log.append("served", seq=7)
    with pytest.raises(TypeError, match="JSON values"):
        log.append("served", thing=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        log.append("")
    assert not (tmp_path / LOG_NAME).exists() or (tmp_path / LOG_NAME).read_bytes() == b""
    log.append("started", nested={"a": [1, 2.5, None, True]}, ratio=float("inf"))
    assert verify(tmp_path).ok


def test_nothing_to_verify_is_an_error_not_a_report(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="privacy folder not found"):
        verify(tmp_path / "nope")
    with pytest.raises(DataError, match="no audit log"):
        verify(tmp_path)


def _append_many(folder: str, worker: int, count: int, start: Any) -> None:
    start.wait()
    log = AuditLog(Path(folder))
    for i in range(count):
        log.served("train", f"worker-{worker}", i, APP, f"site-{worker}")


def test_concurrent_appends_from_processes_make_one_chain(tmp_path: Path) -> None:
    workers, each = 4, 25
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, each, start))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.entries == workers * each and report.counts == {"served": workers * each}
    entries = [json.loads(line) for line in _lines(tmp_path)]
    assert [e["seq"] for e in entries] == list(range(workers * each))
    for w in range(workers):  # each worker's appends, all there and in its own order
        assert [e["round"] for e in entries if e["run_id"] == f"worker-{w}"] == list(
            range(each))


def test_cli_verify_intact_edited_and_missing(tmp_path: Path) -> None:
    folder = tmp_path / "privacy"
    _trail(folder, 4)
    ok = run_mmfed("audit", "verify", folder, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "intact"
    assert "4 entries (refused 1, served 2, started 1)" in ok.stdout
    assert "head seq 3, hash " in ok.stdout and "first " in ok.stdout

    lines = _lines(folder)
    lines[1] = lines[1].replace(b'"round":1', b'"round":5')
    _rewrite(folder, lines)
    bad = run_mmfed("audit", "verify", folder, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [f"{folder / LOG_NAME}: line 2 (seq 1): hash mismatch "
                                       "(entry edited)"]
    assert "intact" not in bad.stdout

    for where in (tmp_path / "nope", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        missing = run_mmfed("audit", "verify", where, timeout=120)
        assert missing.returncode != 0
        assert len(missing.stderr.splitlines()) == 1, missing.stderr
        assert missing.stderr.startswith("mmfed: error: ") and "Traceback" not in missing.stderr


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-1"
    site.mkdir()
    (site / "records.csv").write_text("patient_id,label\n1,0\n")
    return site


def test_every_ledger_record_is_a_release_in_the_trail(tmp_path: Path) -> None:
    site, folder = _site(tmp_path), tmp_path / "ledger"
    ledger = PrivacyLedger(folder, site_fingerprint(site))
    first = ledger.record(run_id="r", round_num=1, event=(1.2, 0.1, 10), delta=1e-5,
                          accountant="rdp", site="site-1")
    second = ledger.record(run_id="r", round_num=2, event=(1.1, 0.2, 7), delta=1e-5,
                           accountant="rdp", site="site-1")
    report = verify(folder)
    assert report.ok, report.problems
    assert report.counts == {"release": 2}
    releases = [json.loads(line) for line in _lines(folder)]
    for audit, entry in zip(releases, (first, second), strict=True):
        assert audit["kind"] == "release"
        for name in ("site", "run_id", "round", "sigma", "sample_rate", "steps", "epsilon",
                     "delta", "accountant"):
            assert audit[name] == getattr(entry, name), name
        assert audit["ledger_time"] == entry.time
        assert audit["fingerprint"] == ledger.fingerprint


def test_privacy_show_ends_with_the_trail_state(tmp_path: Path) -> None:
    site, folder = _site(tmp_path), tmp_path / "ledger"
    assert "audit log" not in show_ledger(site, str(folder), None, None)
    ledger = PrivacyLedger(folder, site_fingerprint(site))
    for round_num in (1, 2):
        ledger.record(run_id="r", round_num=round_num, event=(1.2, 0.1, 10), delta=1e-5,
                      accountant="rdp", site="site-1")
    shown = show_ledger(site, str(folder), None, None).splitlines()
    assert shown[-1] == f"audit log: {folder / LOG_NAME} (2 entries, intact)"
    assert shown[-2].startswith("total: epsilon")

    _rewrite(folder, _lines(folder)[:1])
    (folder / LOG_NAME).chmod(0o644)
    shown = show_ledger(site, str(folder), None, None).splitlines()
    assert shown[-1] == (f"audit log: {folder / LOG_NAME} (1 entry, 2 problems: run mmfed "
                         f"audit verify {folder})")
