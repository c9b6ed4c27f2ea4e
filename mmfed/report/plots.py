"""The report's figures of a run's history, drawn with matplotlib's Agg backend.

Agg is selected before pyplot is imported so that the report renders on headless
servers and CI (no display, no GUI toolkit). Every figure is the same fixed size and
resolution, so the page lays out predictably and the PNGs stay small; every figure has
a title and axis labels, because report figures get copied into slides without their
surrounding text. A figure whose data does not exist (no DP, no sites) is still drawn,
stating why it is empty, so a reader never wonders whether a plot failed to render.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmfed.report.rundata import RunData, number

FIGSIZE = (6.4, 4.0)  # inches; at DPI this is 640 x 400 px
DPI = 100
STATUS_COLORS = {"trained": "#2ca02c", "declined": "#ff7f0e", "dropped": "#d62728"}


@dataclass(frozen=True)
class Plot:
    """A PNG written next to index.html, referenced by its bare file name."""

    file: str
    alt: str

    @property
    def id(self) -> str:
        return "fig-" + self.file.removesuffix(".png")


def new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save(fig: Figure, out: Path, file: str, alt: str) -> Plot:
    """Write at a fixed size (no tight bbox, which would make sizes data-dependent)."""
    try:
        fig.savefig(out / file, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return Plot(file, alt)


def message_plot(out: Path, file: str, title: str, message: str, xlabel: str = "round",
                 ylabel: str = "") -> Plot:
    """A labelled, empty figure that says why there is nothing to plot."""
    fig, ax = new_axes(title, xlabel, ylabel)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=12,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return save(fig, out, file, f"{title}: {message}")


def site_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per site, the same in every figure of the report."""
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: to_hex(palette(i % palette.N))
            for i, name in enumerate(names)}


def _integer_rounds(ax: Axes, rounds: Sequence[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)


def _legend(ax: Axes, entries: int) -> None:
    if entries:
        ax.legend(fontsize="small", ncols=1 + entries // 8, loc="best")


def _all_nan(values: Sequence[float]) -> bool:
    return all(not math.isfinite(v) for v in values)


# Lines that give a figure its meaning: what a model without skill would score.
REFERENCE_LINES = {"auroc": (0.5, "chance (0.5)"), "c_index": (0.5, "chance (0.5)"),
                   "td_auc": (0.5, "chance (0.5)"), "r2": (0.0, "predicting the mean (0)")}


def _reference(ax: Axes, key: str) -> int:
    """Draw the key's no-skill line, if it has one; the number of legend entries added."""
    if key not in REFERENCE_LINES:
        return 0
    value, label = REFERENCE_LINES[key]
    ax.axhline(value, linestyle=":", color="grey", label=label)
    return 1


def global_metric(data: RunData, out: Path, key: str, label: str, unit_interval: bool) -> Plot:
    """One global holdout figure by round (AUROC, R², C-index, loss, ...)."""
    x, y = data.round_numbers, data.global_series(key)
    file = f"global_{key}.png"
    title = f"Global {label} on the holdout by round"
    if _all_nan(y):
        return message_plot(out, file, title, f"no {label} recorded (undefined every round)",
                            ylabel=label)
    fig, ax = new_axes(title, "round", label)
    ax.plot(x, y, marker="o", color="#1f77b4", label=f"global {label}")
    if unit_interval:
        ax.set_ylim(-0.02, 1.02)
    entries = 1 + _reference(ax, key)
    _integer_rounds(ax, x)
    _legend(ax, entries)
    final = y[-1]
    alt = f"{title}; final {final:.3f}" if math.isfinite(final) else title
    return save(fig, out, file, alt)


def site_local_metric(data: RunData, out: Path, key: str = "auroc", label: str = "AUROC",
                      unit_interval: bool = True) -> Plot | None:
    """Each site's figure (the task's headline: AUROC, R², C-index) on its own
    validation split; None when no site reported one."""
    x = data.round_numbers
    series = {s: data.site_series(s, key, local=True) for s in data.site_names}
    series = {s: v for s, v in series.items() if not _all_nan(v)}
    if not series:
        return None
    colors = site_colors(data.site_names)
    fig, ax = new_axes(f"Per-site local {label} by round (own validation split)", "round",
                       label)
    for site, values in series.items():
        ax.plot(x, values, marker="o", color=colors[site], label=site)
    if unit_interval:
        ax.set_ylim(-0.02, 1.02)
    _integer_rounds(ax, x)
    _legend(ax, len(series))
    return save(fig, out, f"site_local_{key}.png",
                f"Per-site local {label} by round for {len(series)} site(s)")


def site_local_auroc(data: RunData, out: Path) -> Plot | None:
    """Each site's AUROC on its own validation split (a classification run's headline)."""
    return site_local_metric(data, out, "auroc", "AUROC", unit_interval=True)


def _budget(data: RunData, site: str) -> float:
    """The site's ε budget: its last per-round report, else the summary's."""
    for value in reversed(data.site_series(site, "epsilon_budget")):
        if math.isfinite(value):
            return value
    return number(data.summary_sites.get(site, {}).get("epsilon_budget"))


def privacy_epsilon(data: RunData, out: Path) -> Plot:
    """Cumulative ε spent per site by round, each site's budget as a dashed line."""
    file, title = "privacy_epsilon.png", "Privacy spent (ε) by round per site"
    x = data.round_numbers
    series = {s: data.site_series(s, "epsilon") for s in data.site_names}
    series = {s: v for s, v in series.items() if not _all_nan(v)}
    if not series:
        why = ("differential privacy was OFF: no ε to plot" if not data.dp_configured
               else "DP was enabled but no site reported ε")
        if not data.federated:
            why = "centralized run without differential privacy: no ε to plot"
        return message_plot(out, file, title, why, ylabel="ε (cumulative)")
    colors = site_colors(data.site_names)
    fig, ax = new_axes(title, "round", "ε (cumulative, at the run's δ)")
    for site, values in series.items():
        ax.plot(x, values, marker="o", color=colors[site], label=f"{site} ε")
    # Sites with equal budgets share one dashed line (in the site's colour when it is
    # alone), so identical budgets do not hide each other's legend entries.
    budgets: dict[float, list[str]] = {}
    for site in series:
        budget = _budget(data, site)
        if math.isfinite(budget):
            budgets.setdefault(budget, []).append(site)
    for budget, owners in budgets.items():
        color = colors[owners[0]] if len(owners) == 1 else "#444444"
        who = ", ".join(owners) if len(owners) <= 3 else f"{len(owners)} sites"
        ax.axhline(budget, linestyle="--", color=color, alpha=0.8,
                   label=f"budget ε = {budget:g} ({who})")
    entries = len(series) + len(budgets)
    ax.set_ylim(bottom=0)
    _integer_rounds(ax, x)
    _legend(ax, entries)
    return save(fig, out, file, f"{title}, with each site's budget dashed")


def participation(data: RunData, out: Path) -> Plot:
    """Stacked bars: how many sites trained, declined (budget) or dropped per round."""
    file, title = "participation.png", "Site participation by round"
    x = data.round_numbers
    counts = data.status_counts()
    if not any(sum(v) for v in counts.values()):
        return message_plot(out, file, title, "no sites took part (centralized run)",
                            ylabel="sites")
    fig, ax = new_axes(title, "round", "sites")
    bottom = [0] * len(x)
    for status, values in counts.items():
        ax.bar(x, values, bottom=bottom, color=STATUS_COLORS[status], label=status, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(max(bottom), 1) * 1.15)
    _integer_rounds(ax, x)
    _legend(ax, len(counts))
    return save(fig, out, file, f"{title}: trained, declined and dropped sites stacked")


def byte_unit(largest: float) -> tuple[str, float]:
    """A readable unit for a byte count (binary prefixes, as transfer tools print)."""
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= scale:
            return unit, scale
    return "B", 1.0


def communication_bytes(data: RunData, out: Path) -> Plot:
    file, title = "bytes.png", "Bytes exchanged per round"
    x = data.round_numbers
    up, down = data.series("bytes", "up"), data.series("bytes", "down")
    finite = [v for v in up + down if math.isfinite(v)]
    if not finite or max(finite) <= 0:
        return message_plot(out, file, title, "no model updates were exchanged "
                            "(centralized run)" if not data.federated else
                            "no byte counts recorded", ylabel="bytes")
    unit, scale = byte_unit(max(finite))
    fig, ax = new_axes(title, "round", f"{unit} per round (all sites)")
    width = 0.38
    ax.bar([r - width / 2 for r in x], [v / scale for v in up], width=width,
           label="up (sites → server)", color="#1f77b4")
    ax.bar([r + width / 2 for r in x], [v / scale for v in down], width=width,
           label="down (server → sites)", color="#9467bd")
    _integer_rounds(ax, x)
    _legend(ax, 2)
    return save(fig, out, file, f"{title}, up and down, in {unit}")


def stage_seconds(data: RunData) -> dict[str, list[float]]:
    """Seconds per round split by stage, plus the unaccounted remainder as 'other'.

    Stages are whatever the run recorded besides the round total (train, evaluate, the
    secure-aggregation steps); only a run without any has just the total.
    """
    names: list[str] = []
    for line in data.rounds:
        for key in data.part(line, "seconds"):
            if key != "round" and key not in names:
                names.append(key)
    stages = {name: [v if math.isfinite(v) else 0.0 for v in data.series("seconds", name)]
              for name in names}
    total = data.series("seconds", "round")
    if not stages:
        return {"round": [v if math.isfinite(v) else 0.0 for v in total]}
    other = []
    for i, t in enumerate(total):
        rest = t - sum(v[i] for v in stages.values()) if math.isfinite(t) else 0.0
        other.append(rest if rest > 0.01 * t else 0.0)
    if any(other):
        stages["other"] = other
    return stages


def communication_seconds(data: RunData, out: Path) -> Plot:
    file, title = "seconds.png", "Wall-clock seconds per round by stage"
    x = data.round_numbers
    stages = stage_seconds(data)
    if not any(any(v) for v in stages.values()):
        return message_plot(out, file, title, "no timings recorded", ylabel="seconds")
    fig, ax = new_axes(title, "round", "seconds")
    palette = plt.get_cmap("tab10")
    bottom = [0.0] * len(x)
    for i, (stage, values) in enumerate(stages.items()):
        ax.bar(x, values, bottom=bottom, width=0.7, label=stage,
               color="#bbbbbb" if stage == "other" else palette(i % palette.N))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    _integer_rounds(ax, x)
    _legend(ax, len(stages))
    return save(fig, out, file, f"{title}: " + ", ".join(stages))


def baseline_metric(data: RunData, base: RunData, out: Path, key: str = "auroc",
                    label: str = "AUROC", unit_interval: bool = True) -> Plot:
    """This run and the reference run on one plot (centralized rounds are epochs), in the
    task's headline figure."""
    title = f"Global {label} by round: this run vs baseline"
    fig, ax = new_axes(title, "round (centralized: epoch)", f"holdout {label}")
    ax.plot(data.round_numbers, data.global_series(key), marker="o", color="#1f77b4",
            label=f"{data.mode} ({data.path.name})")
    ax.plot(base.round_numbers, base.global_series(key), marker="s", linestyle="--",
            color="#d62728", label=f"baseline: {base.mode} ({base.path.name})")
    entries = 2 + _reference(ax, key)
    if unit_interval:
        ax.set_ylim(-0.02, 1.02)
    _integer_rounds(ax, data.round_numbers + base.round_numbers)
    _legend(ax, entries)
    return save(fig, out, f"baseline_{key}.png",
                f"{title}: {data.mode} run against {base.mode} baseline")


def baseline_auroc(data: RunData, base: RunData, out: Path) -> Plot:
    """This run and the reference run in AUROC (a classification run's headline)."""
    return baseline_metric(data, base, out, "auroc", "AUROC", unit_interval=True)
