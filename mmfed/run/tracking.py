"""TensorBoard event logs of every per-round figure, so `tensorboard --logdir RUN` works.

The run directory's metrics.jsonl stays the source of truth; this mirrors each line as
scalars (global, per site, privacy, secure aggregation, bytes, timings) for people who
live in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RoundCallback = Callable[[dict[str, Any]], None]


def scalars(line: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Every finite number in a metrics line, tagged by its path (bools as 0/1)."""
    def walk(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from walk(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, bool):
            yield prefix, float(value)
        elif isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            yield prefix, float(value)

    for key, value in line.items():
        if key not in ("round", "epoch"):
            yield from walk(key, value)


class TensorBoardLog:
    """Writes one scalar per figure per round into RUN/tensorboard/."""

    def __init__(self, run: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def __call__(self, line: dict[str, Any]) -> None:
        step = int(line.get("round", 0))
        for tag, value in scalars(line):
            self.writer.add_scalar(tag, value, step)
        for name, site in line.get("sites", {}).items():
            status = site.get("status")
            for option in ("trained", "declined", "dropped"):
                self.writer.add_scalar(f"sites/{name}/is_{option}", float(status == option),
                                       step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def chain(*callbacks: RoundCallback | None) -> RoundCallback:
    def call(line: dict[str, Any]) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(line)
    return call
