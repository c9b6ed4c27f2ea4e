"""`mmfed privacy show`: a site's spending history, with ε recomputed from the events."""

from __future__ import annotations

import time
from pathlib import Path

from mmfed.errors import DataError
from mmfed.privacy.audit import LOG_NAME
from mmfed.privacy.audit import summary as audit_summary
from mmfed.privacy.audit import verify as verify_audit
from mmfed.privacy.ledger import PrivacyLedger, ledger_dir, site_fingerprint


def show_ledger(site: Path, directory: str, delta: float | None,
                accountant: str | None) -> str:
    if not site.is_dir():
        raise DataError(f"{site}: site folder not found")
    ledger = PrivacyLedger(ledger_dir(directory), site_fingerprint(site))
    entries = ledger.entries()
    if not entries:
        return "\n".join([f"{site}: no privacy spending recorded (ledger {ledger.path}; "
                          f"data fingerprint {ledger.fingerprint[:16]}…)",
                          *_audit_line(ledger.directory)])
    delta = delta if delta is not None else entries[-1].delta
    accountant = accountant or entries[-1].accountant
    lines = [f"{site}: privacy ledger {ledger.path}",
             f"data fingerprint {ledger.fingerprint[:16]}…, {len(entries)} release(s)",
             f"{'when':19}  {'run':10}  {'round':>5}  {'sigma':>7}  {'q':>7}  {'steps':>5}  "
             f"{'eps after':>9}"]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
        lines.append(f"{when:19}  {e.run_id[:10]:10}  {e.round:>5}  {e.sigma:>7.4f}  "
                     f"{e.sample_rate:>7.4f}  {e.steps:>5}  {e.epsilon:>9.4f}"
                     + ("  distributed (Skellam)" if e.skellam is not None else ""))
    total = ledger.spent(delta, accountant)
    lines.append(f"total: epsilon = {total:.4f} at delta = {delta:g} ({accountant} accountant, "
                 "recomputed from every release)")
    lines.extend(_audit_line(ledger.directory))
    return "\n".join(lines)


def _audit_line(folder: Path) -> list[str]:
    """Whether the folder's audit trail holds, so a reader of the spending history
    learns when the record of it has been tampered with."""
    if not (folder / LOG_NAME).exists():
        return []
    return [audit_summary(verify_audit(folder))]
