"""TensorBoard event logs of every per-round figure, so `tensorboard --logdir RUN` works.

The run directory's metrics.jsonl stays the source of truth; this mirrors each line as
scalars (global, per site, privacy, secure aggregation, bytes, timings) for people who
live in TensorBoard.

A site's local evaluation arrives one round late (round r's train replies evaluate
the model of round r - 1, named by the line's ``local_model``), so its scalars are
logged at the step of the model they describe, and the final model's
(``local_final``) at the last round: ``sites/<name>/local/*`` is one series by model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RoundCallback = Callable[[dict[str, Any]], None]
_LOCAL = ("local", "local_final")  # a site entry's local evaluations


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
        if key not in ("round", "epoch", "local_model"):
            yield from walk(key, value)


def local_scalars(line: dict[str, Any]) -> Iterator[tuple[str, float, int]]:
    """Each site's local figures as (tag, value, step): the step is the round whose
    model they evaluated, ``local_model`` for ``local`` (the round itself in runs that
    predate it) and the line's own round for ``local_final``."""
    step = int(line.get("round", 0))
    model = line.get("local_model", step)
    for name, site in line.get("sites", {}).items():
        if not isinstance(site, dict):
            continue
        for key, at in zip(_LOCAL, (model, step), strict=True):
            figures = site.get(key)
            if isinstance(figures, dict) and isinstance(at, int):
                for tag, value in scalars({"sites": {name: {"local": figures}}}):
                    yield tag, value, at


def _is_local(tag: str) -> bool:
    parts = tag.split("/")
    return len(parts) > 3 and parts[0] == "sites" and parts[2] in _LOCAL


class TensorBoardLog:
    """Writes one scalar per figure per round into RUN/tensorboard/."""

    def __init__(self, run: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def __call__(self, line: dict[str, Any]) -> None:
        step = int(line.get("round", 0))
        for tag, value in scalars(line):
            if not _is_local(tag):
                self.writer.add_scalar(tag, value, step)
        for tag, value, at in local_scalars(line):
            self.writer.add_scalar(tag, value, at)
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
