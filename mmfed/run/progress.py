"""Live progress for long runs: a rich display on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class Progress:
    """Shows round, sites reporting, global AUROC and elapsed time / ETA."""

    def __init__(self, total_rounds: int, title: str, live: bool | None = None) -> None:
        self.total = total_rounds
        self.title = title
        self.console = Console(stderr=True)
        self.live_enabled = sys.stderr.isatty() if live is None else live
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self._live: Live | None = None
        self.kind = "classification"  # set from the first round's figures

    def __enter__(self) -> Progress:
        if self.live_enabled:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def _table(self) -> Table:
        elapsed = time.perf_counter() - self.started
        done = len(self.rows)
        eta = elapsed / done * (self.total - done) if done else None
        table = Table(title=f"{self.title} — round {done}/{self.total}, "
                      f"{elapsed:.0f}s elapsed" + (f", ETA {eta:.0f}s" if eta else ""))
        from mmfed.ml.task import PROGRESS_KEYS

        (_, first), (_, second) = PROGRESS_KEYS[self.kind]
        for col in ("round", "sites", first, second, "loss", "max ε / budget", "seconds"):
            table.add_column(col, justify="right")
        for row in self.rows[-12:]:
            table.add_row(*row.values())
        return table

    def round_done(self, line: dict[str, Any]) -> None:
        from mmfed.ml.task import PROGRESS_KEYS, kind_of_metrics

        g = line.get("global", {})
        self.kind = kind_of_metrics(g)
        (k1, name1), (k2, _) = PROGRESS_KEYS[self.kind]
        agg = line.get("aggregation", {})
        n_sites = len(line.get("sites", {}))
        sites = f"{agg.get('participants', 0)}/{n_sites}" if n_sites else "pooled"
        spent = [(s["epsilon"], s.get("epsilon_budget")) for s in line.get("sites", {}).values()
                 if s.get("epsilon") is not None]
        eps = "-"
        if spent:
            worst = max(spent, key=lambda p: p[0] / (p[1] or 1.0))
            eps = f"{worst[0]:.2f} / {worst[1]:.2f}" if worst[1] else f"{worst[0]:.2f}"
        states = [s.get("status") for s in line.get("sites", {}).values()]
        if "declined" in states or "dropped" in states:
            sites += f" ({states.count('declined')} declined, {states.count('dropped')} dropped)"
        row = {"round": str(line.get("round", len(self.rows) + 1)), "sites": sites,
               "first": _fmt(g.get(k1)), "second": _fmt(g.get(k2)),
               "loss": _fmt(g.get("loss")), "epsilon": eps,
               "seconds": _fmt(line.get("seconds", {}).get("round"), 1)}
        self.rows.append(row)
        if self._live is not None:
            self._live.update(self._table())
        else:
            self.console.print(f"{self.title}: round {row['round']}/{self.total}: sites "
                               f"{sites}, {name1} {row['first']}, loss {row['loss']}, "
                               f"ε {eps} ({row['seconds']}s)", highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)
