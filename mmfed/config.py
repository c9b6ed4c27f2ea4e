"""The run configuration: one flat, typed, validated key space.

The same dotted keys (``train.lr``) work in a TOML file (as nested tables), on the
command line (``--set train.lr=0.01``), in ``[tool.flwr.app.config]`` and in Flower's
run config, so a run is reproducible from its ``config.toml`` whichever way it was
started. Unknown keys, wrong types and out-of-range values are refused before
anything starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmfed.errors import ConfigError
from mmfed.ml.specs import FUSIONS, MODALITY_NAMES, ModelSpec, TrainSpec
from mmfed.toml_text import toml_value

Value = bool | int | float | str | list[str]

DEFAULTS: dict[str, Value] = {
    "seed": 0,
    "rounds": 5,
    "data.dir": "",  # federation folder; empty = synthesize into RUN/data
    "data.sites": 3,
    "data.patients_per_site": 400,
    "data.holdout": 600,
    "data.genes": 2000,
    "data.patient_missing": 0.1,
    "data.missing": [],  # synthesized cohort: whole modalities absent, "genomics@site-2"
    "data.val_fraction": 0.15,
    "model.fusion": "gated",
    "model.embed_dim": 8,
    "model.hidden": 16,
    "model.dropout": 0.1,
    "model.image_channels": 4,
    # mask: an absent modality contributes nothing; zero_fill: the naive baseline that
    # feeds zeros as if they were data (for comparisons only)
    "model.missing": "mask",
    "train.local_epochs": 4,
    "train.batch_size": 128,
    "train.lr": 0.005,
    "train.weight_decay": 2.0,
    "train.class_weighting": "balanced",
    "train.modalities": list(MODALITY_NAMES),
    "train.modality_dropout": 0.0,  # chance of hiding each present modality per patient
    "train.device": "auto",  # auto: CUDA when present; or cpu, cuda, cuda:N
    "federation.fraction_train": 1.0,
    "federation.min_sites": 1,
    "federation.round_timeout": 900.0,
    "federation.local_eval": True,
    "simulation.cpus_per_site": 1.0,
    # Ray num_gpus per virtual site when training on CUDA; 0: the GPUs are shared by the
    # sites that run at once (as many as the CPUs allow). Ignored on the CPU.
    "simulation.gpus_per_site": 0.0,
    # Each encoder averaged over the sites (and patients) that had its modality.
    "aggregation.modality_aware": True,  # each encoder averaged over who trained it
    "aggregation.rule": "fedavg",  # plaintext only: fedavg, median, trimmed_mean
    "aggregation.trim_fraction": 0.1,  # trimmed_mean: share cut from each end
    # L2 bound on a site's update (new − global weights); 0 = no bound. The averaged
    # update of a default DP round measures 3.4 (README, "Bad updates").
    "aggregation.max_update_norm": 100.0,
    # On by default: DP-SGD at ε = 8 per site costs the default federation about 0.013
    # holdout AUROC (0.865 vs 0.878); --no-dp turns it off, with a warning every round.
    "privacy.enabled": True,
    "privacy.epsilon": 8.0,
    "privacy.delta": 1e-5,
    "privacy.max_grad_norm": 1.0,
    "privacy.accountant": "rdp",
    "privacy.max_noise_multiplier": 10.0,
    "privacy.grad_sample_mode": "hooks",
    "privacy.ledger_dir": "",  # empty: ~/.mmfed/privacy-ledger
    "secagg.enabled": True,
    "secagg.threshold": 0,  # 0: more than half of each share group
    "secagg.neighbours": 0,  # 0: every site is every site's neighbour (SecAgg)
    "secagg.clip_range": 1.0,  # per-coordinate clipping of updates before quantizing
    "secagg.count_cap": 10000,  # example counts are sent as n / count_cap
    "faults.drop": [],  # fault injection for drills: "site-name:round:stage"
    "faults.corrupt": [],  # "site-name:round:kind", kind nan, shape or huge (a bad update)
    "out": "",
    "run_id": "",  # set when the run directory is created
}
# Per-site policies in simulation: privacy.site.<site name>.<field>, e.g.
# privacy.site.site-3.epsilon = 1.0 (a site can be stricter than the server, never looser).
SITE_POLICY_FIELDS = ("enabled", "epsilon", "delta", "max_grad_norm", "accountant",
                      "max_noise_multiplier")
_SITE_KEY = re.compile(r"^privacy\.site\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.([a-z_]+)$")


def _in(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _modalities(v: list[str]) -> str | None:
    bad = [m for m in v if m not in MODALITY_NAMES]
    if bad or not v or len(set(v)) != len(v):
        return f"must be a non-empty list of distinct {', '.join(MODALITY_NAMES)}"
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "seed": _in(0, 2**31 - 1),
    "rounds": _in(1, 10_000),
    "data.sites": _in(1, 1000),
    "data.patients_per_site": _in(20, 1_000_000),
    "data.holdout": _in(20, 1_000_000),
    "data.genes": _in(10, 100_000),
    "data.patient_missing": _in(0.0, 0.95),
    "data.val_fraction": _in(0.0, 0.5),
    "model.fusion": _choice(FUSIONS),
    "model.missing": _choice(("mask", "zero_fill")),
    "data.missing": lambda v: None if all(
        len(x.split("@")) == 2 and x.split("@")[0] in MODALITY_NAMES[1:] for x in v)
    else "each entry must be MODALITY@SITE with MODALITY images or genomics",
    "model.embed_dim": _in(2, 1024),
    "model.hidden": _in(2, 4096),
    "model.dropout": _in(0.0, 0.9),
    "model.image_channels": _in(4, 256),
    "train.local_epochs": _in(1, 1000),
    "train.batch_size": _in(1, 65536),
    "train.lr": _in(1e-7, 10.0),
    "train.weight_decay": _in(0.0, 10.0),
    "train.class_weighting": _choice(("balanced", "none")),
    "train.modalities": _modalities,
    "train.modality_dropout": _in(0.0, 0.9),
    "train.device": lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v)
    else "must be auto, cpu, cuda, cuda:N or mps",
    "federation.fraction_train": _in(0.01, 1.0),
    "federation.min_sites": _in(1, 1000),
    "federation.round_timeout": _in(1.0, 86400.0),
    "simulation.cpus_per_site": _in(0.1, 64.0),
    "simulation.gpus_per_site": _in(0.0, 64.0),
    "privacy.epsilon": _in(1e-3, 1000.0),
    "privacy.delta": _in(1e-12, 0.1),
    "privacy.max_grad_norm": _in(1e-4, 1000.0),
    "privacy.accountant": _choice(("rdp", "prv")),
    "privacy.max_noise_multiplier": _in(0.1, 1000.0),
    "privacy.grad_sample_mode": _choice(("ghost", "hooks")),
    "aggregation.rule": _choice(("fedavg", "median", "trimmed_mean")),
    "aggregation.trim_fraction": _in(0.0, 0.45),
    "aggregation.max_update_norm": _in(0.0, 1e12),
    "secagg.threshold": _in(0, 100_000),
    "secagg.neighbours": _in(0, 100_000),
    "secagg.clip_range": _in(1e-6, 1e6),
    "secagg.count_cap": _in(1, 1_000_000),
    "faults.drop": lambda v: None if all(
        len(x.split(":")) == 3 and x.split(":")[1].isdigit()
        and x.split(":")[2] in ("train", "share", "mask", "unmask") for x in v)
    else "each entry must be site:round:stage with stage train, share, mask or unmask",
    "faults.corrupt": lambda v: None if all(
        len(x.split(":")) == 3 and x.split(":")[1].isdigit()
        and x.split(":")[2] in ("nan", "shape", "huge") for x in v)
    else "each entry must be site:round:kind with kind nan, shape or huge",
}


def _default_key(key: str) -> str | None:
    """The key whose default and check apply to ``key`` (itself, or a site policy field)."""
    if key in DEFAULTS:
        return key
    match = _SITE_KEY.match(key)
    if match and match.group(2) in SITE_POLICY_FIELDS:
        return f"privacy.{match.group(2)}"
    return None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _coerce(key: str, value: Any) -> Value:
    """Check one value against its default's type; ints are accepted where floats are."""
    base = _default_key(key) or key
    if not key.isprintable() or key != key.strip():  # "...epsilon\n" would pass the regex
        raise ConfigError(f"config key {key!r}: unexpected whitespace or control characters")
    default = DEFAULTS[base]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
            raise ConfigError(f"config key '{key}': out of range (got a "
                              f"{value.bit_length()}-bit integer)")
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        if isinstance(value, str):  # Flower's run config has no lists: accept "a,b"
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {type(default).__name__}, got "
                          f"{value!r}")
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if any("\ud800" <= c <= "\udfff" for text in texts for c in text):
        # undecodable command-line bytes arrive as lone surrogates: unwritable as TOML
        raise ConfigError(f"config key '{key}': not valid UTF-8 text (got {value!r})")
    check = CHECKS.get(base)
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"config key '{key}': {problem} (got {value!r})")
    return value  # type: ignore[no-any-return]


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer too long for int()
        value = text.strip()  # bare words are strings: --set model.fusion=concat
    if isinstance(DEFAULTS.get(key), str) and not isinstance(value, str):
        value = text.strip()  # string keys take the text as written: --set out=2024
    return key, value


class RunConfig:
    """A validated, fully resolved configuration."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values: dict[str, Value] = {k: list(v) if isinstance(v, list) else v
                                         for k, v in DEFAULTS.items()}
        for key, value in (values or {}).items():
            self.set(key, value)

    def set(self, key: str, value: Any) -> None:
        if _default_key(key) is None:
            close = [k for k in DEFAULTS if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        self.values[key] = _coerce(key, value)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @staticmethod
    def load(path: Path | None = None, overrides: list[str] | None = None,
             extra: Mapping[str, Any] | None = None) -> RunConfig:
        """File first, then explicit command-line values (``extra``), then ``--set``."""
        cfg = RunConfig()
        if path is not None:
            try:
                tree = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read config ({exc})") from None
            except ValueError as exc:  # TOMLDecodeError, or an integer too long for int()
                raise ConfigError(f"{path}: not valid TOML ({exc})") from None
            for key, value in _flatten(tree).items():
                cfg.set(key, value)
        for key, value in (extra or {}).items():
            if value is not None:
                cfg.set(key, value)
        for item in overrides or []:
            cfg.set(*_parse_override(item))
        return cfg

    @staticmethod
    def from_flower(run_config: Mapping[str, Any]) -> RunConfig:
        """From Flower's run config (pyproject defaults + ``--run-config``)."""
        return RunConfig({k: v for k, v in run_config.items()})

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flower config records hold scalars; lists travel as comma-joined text."""
        return {k: ",".join(v) if isinstance(v, list) else v for k, v in self.values.items()}

    def to_toml(self) -> str:
        top = [f"{k} = {toml_value(v)}" for k, v in self.values.items() if "." not in k]
        tables: dict[str, list[str]] = {}
        for k, v in self.values.items():
            if "." in k:
                table, name = k.split(".", 1)
                tables.setdefault(table, []).append(f"{name} = {toml_value(v)}")
        body = "\n".join(top)
        for table, lines in tables.items():
            body += f"\n\n[{table}]\n" + "\n".join(lines)
        return "# mmfed resolved run configuration\n" + body + "\n"

    def privacy_request(self) -> dict[str, Any]:
        """The server's privacy settings: what every site must at least meet."""
        return {f: self[f"privacy.{f}"] for f in SITE_POLICY_FIELDS}

    def site_privacy(self, site: str) -> dict[str, Any]:
        """A simulated site's own policy: the run's settings with its per-site entries."""
        policy = self.privacy_request()
        for field in SITE_POLICY_FIELDS:
            key = f"privacy.site.{site}.{field}"
            if key in self.values:
                policy[field] = self.values[key]
        return policy

    def model_spec(self) -> ModelSpec:
        return ModelSpec(fusion=self["model.fusion"], embed_dim=self["model.embed_dim"],
                         hidden=self["model.hidden"], dropout=self["model.dropout"],
                         image_channels=self["model.image_channels"],
                         missing=self["model.missing"])

    def train_spec(self) -> TrainSpec:
        return TrainSpec(epochs=self["train.local_epochs"], batch_size=self["train.batch_size"],
                         lr=self["train.lr"], weight_decay=self["train.weight_decay"],
                         class_weighting=self["train.class_weighting"],
                         modalities=tuple(self["train.modalities"]),
                         modality_dropout=self["train.modality_dropout"],
                         device=self["train.device"])
