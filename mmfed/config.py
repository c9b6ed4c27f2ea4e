"""The run configuration: one typed schema, seen as one flat, validated key space.

The pydantic models below are the only place a key, its type, default, bounds and
purpose are written down; the flat dotted keys (``train.lr``), ``DEFAULTS``, the per-site
privacy fields, the model and training specs, ``configs/default.toml`` and
``[tool.flwr.app.config]`` all follow from them (tests/test_config.py fails when either
file drifts). The same keys work in a TOML file (as nested tables), on the command line
(``--set train.lr=0.01``) and in Flower's run config, so a run is reproducible from its
``config.toml`` whichever way it was started. Unknown keys, wrong types and out-of-range
values are refused with a one-line ``ConfigError`` before anything starts.

Cheap Flower message handlers import this module: it must not import torch, numpy,
pandas or flwr.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmfed.errors import ConfigError

Value = bool | int | float | str | list[str]

Modality = Literal["records", "images", "genomics"]
Fusion = Literal["concat", "gated"]
MODALITY_NAMES: tuple[str, ...] = get_args(Modality)
FUSIONS: tuple[str, ...] = get_args(Fusion)
# An encoder entry point: dotted module path, a colon, a dotted attribute path.
ENTRY_POINT = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
ENCODER_KEYS = ("image_encoder", "record_encoder", "genomic_encoder")
# `flwr run .` has no --out flag, so the app's declared default names a folder.
FLWR_RUN_OUT = "runs/flwr-run"
_STAGES = ("train", "share", "mask", "unmask")
_CORRUPTIONS = ("nan", "shape", "huge")


def _site_round_entries(entries: tuple[str, ...], last: tuple[str, ...],
                        form: str) -> tuple[str, ...]:
    """Fault drills name a site, a round and what happens; a typo must not silently
    inject nothing."""
    if all(len(x.split(":")) == 3 and x.split(":")[1].isdigit() and x.split(":")[2] in last
           for x in entries):
        return entries
    raise ValueError(f"each entry must be {form}")


class _Section(BaseModel):
    """Immutable and closed: a spec handed to training cannot change under it, and a
    misspelt field is an error rather than a silently ignored setting."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    """Where the sites' data comes from, or how the synthetic cohort is drawn."""

    dir: str = Field(
        default="",
        description="a federation folder; empty synthesizes the default cohort into "
        "RUN/data, so a first run needs no data")
    sites: int = Field(
        default=3, ge=1, le=1000,
        description="synthetic sites (a deployment counts the sites that join instead)")
    patients_per_site: int = Field(
        default=400, ge=20, le=1_000_000,
        description="small enough for a laptop run, large enough for DP-SGD to learn")
    holdout: int = Field(
        default=600, ge=20, le=1_000_000,
        description="a shared evaluation set no site trains on, so runs are comparable")
    genes: int = Field(
        default=2000, ge=10, le=100_000,
        description="many more genomic features than patients, like real expression panels")
    patient_missing: float = Field(
        default=0.1, ge=0.0, le=0.95,
        description="chance that a patient lacks a modality, as in real cohorts")
    missing: tuple[str, ...] = Field(
        default=(),
        description='whole modalities absent at a site ("genomics@site-2"), to exercise '
        "modality-aware aggregation on the synthetic cohort")
    val_fraction: float = Field(
        default=0.15, ge=0.0, le=0.5,
        description="each site's local validation share, to compare sites without the "
        "holdout")

    @field_validator("missing")
    @classmethod
    def _missing(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        if all(len(x.split("@")) == 2 and x.split("@")[0] in MODALITY_NAMES[1:]
               for x in entries):
            return entries
        raise ValueError("each entry must be MODALITY@SITE with MODALITY images or genomics")


class ModelConfig(_Section):
    """Architecture hyper-parameters: every site must build the same network."""

    fusion: Fusion = Field(
        default="gated",
        description="gated weighs the modalities each patient has; concat is the simpler "
        "baseline")
    embed_dim: int = Field(
        default=8, ge=2, le=1024,
        description="each encoder's output; small, since DP noise grows with the number of "
        "parameters")
    hidden: int = Field(
        default=16, ge=2, le=4096,
        description="the head's hidden layer; small for the same reason")
    dropout: float = Field(
        default=0.1, ge=0.0, le=0.9,
        description="the head's dropout; off under DP-SGD, whose noise regularizes already")
    image_channels: int = Field(
        default=4, ge=4, le=256,
        description="the image encoder's width; small for the same reason as embed_dim")
    cat_embed_dim: int = Field(
        default=4, ge=1, le=1024,
        description="per categorical record field: few categories need few dimensions")
    genomics_hidden: int = Field(
        default=4, ge=1, le=4096,
        description="thousands of genes and few patients: a very narrow layer resists "
        "overfitting")
    genomics_dropout: float = Field(
        default=0.8, ge=0.0, le=0.9,
        description="heavy, for the same reason; off under DP-SGD like the head's")
    missing: Literal["mask", "zero_fill"] = Field(
        default="mask",
        description="mask: an absent modality contributes nothing; zero_fill feeds zeros "
        "as if they were data (the naive baseline, for comparisons only)")
    image_encoder: str = Field(
        default="",
        description='your own image encoder, "package.module:factory" with factory(out_dim, '
        "schema) returning a torch module from (n, 1, H, W) images to (n, out_dim); empty: "
        "the built-in one (README, Bring your own encoder)")
    record_encoder: str = Field(
        default="",
        description='your own record encoder, "package.module:factory", a module from '
        "(numeric, numeric_missing, categorical) to (n, out_dim); empty: the built-in one")
    genomic_encoder: str = Field(
        default="",
        description='your own genomic encoder, "package.module:factory", a module from '
        "(n, genes) to (n, out_dim); empty: the built-in one")

    @field_validator("image_encoder", "record_encoder", "genomic_encoder")
    @classmethod
    def _entry_point(cls, value: str) -> str:
        if value == "" or re.fullmatch(ENTRY_POINT, value):
            return value
        raise ValueError('must be "package.module:factory" (dotted Python names) or empty')


class TrainConfig(_Section):
    """Local optimisation at each site, every round."""

    local_epochs: int = Field(
        default=4, ge=1, le=1000,
        description="passes over the site's data per round: more need fewer rounds, but "
        "the sites drift apart further")
    batch_size: int = Field(
        default=128, ge=1, le=65536,
        description="also DP-SGD's expected lot size, which sets the privacy cost of a step")
    lr: float = Field(
        default=0.005, ge=1e-7, le=10.0,
        description="tuned together with batch_size and weight_decay for the default "
        "cohort: change one, retune the others")
    weight_decay: float = Field(
        default=2.0, ge=0.0, le=10.0,
        description="strong, because small sites overfit quickly")
    class_weighting: Literal["balanced", "none"] = Field(
        default="balanced",
        description="balanced keeps a rare class from being ignored at a skewed site")
    modalities: tuple[str, ...] = Field(
        default=MODALITY_NAMES,
        description="the modalities trained and evaluated, for ablations")
    modality_dropout: float = Field(
        default=0.0, ge=0.0, le=0.9,
        description="chance of hiding each present modality per patient, so the model "
        "copes when one is missing")
    device: str = Field(
        default="auto",
        description="auto uses CUDA when present, so one config runs anywhere; or cpu, "
        "cuda, cuda:N, mps")
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw",
        description="adamw for local epochs; sgd for full-batch rounds, where the server's "
        "weighted average of the sites' steps is then exactly one SGD step on the "
        "federation's mean gradient (FedSGD)")
    full_batch: bool = Field(
        default=False,
        description="each local step uses all of a site's training patients (sample rate "
        "1): fewer, larger steps, whose DP noise is spread over every patient; what small "
        "sites and strict budgets need (configs/fedsgd.toml, benchmarks/dp_utility.py)")

    @model_validator(mode="before")
    @classmethod
    def _epochs_alias(cls, data: Any) -> Any:
        """``epochs`` is what the training loops call it; given, it wins over
        ``local_epochs`` (``type(spec)(**{**spec.__dict__, "epochs": 1})``)."""
        if isinstance(data, Mapping) and "epochs" in data:
            data = {k: v for k, v in data.items() if k != "epochs"} | {
                "local_epochs": data["epochs"]}
        return data

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value) or any(
                m not in MODALITY_NAMES for m in value):
            raise ValueError("must be a non-empty list of distinct "
                             f"{', '.join(MODALITY_NAMES)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @property
    def epochs(self) -> int:
        """The training loops' name for ``local_epochs``."""
        return self.local_epochs


class FederationConfig(_Section):
    """How the server runs a round."""

    fraction_train: float = Field(
        default=1.0, ge=0.01, le=1.0,
        description="share of the sites asked to train each round, to spread the load "
        "in large federations")
    min_sites: int = Field(
        default=1, ge=1, le=1000,
        description="a round with fewer answers is not aggregated")
    round_timeout: float = Field(
        default=900.0, ge=1.0, le=86400.0,
        description="seconds before a silent site counts as dropped, so one stuck site "
        "cannot stall the federation")
    local_eval: bool = Field(
        default=True,
        description="sites also report metrics on their own validation data, which shows "
        "where the global model fits badly")


class SimulationConfig(_Section):
    """Ray resources per virtual site (simulation only)."""

    cpus_per_site: float = Field(
        default=1.0, ge=0.1, le=64.0,
        description="how many sites train at once: the CPUs divided by this")
    gpus_per_site: float = Field(
        default=0.0, ge=0.0, le=64.0,
        description="Ray num_gpus per site on CUDA; 0 lets the sites that run at once "
        "share the GPUs. Ignored on the CPU")
    ray_address: str = Field(
        default="",
        description="an existing Ray cluster to run on (as `ray start` prints it, e.g. "
        "10.0.0.5:6379); empty uses RAY_ADDRESS, or else starts Ray on this machine. "
        "Every node must see the site folders at the same path")


class AggregationConfig(_Section):
    """How the sites' updates become the next global model."""

    modality_aware: bool = Field(
        default=True,
        description="each encoder averaged over the sites and patients that had its "
        "modality, so sites without it do not pull it back")
    rule: Literal["fedavg", "median", "trimmed_mean"] = Field(
        default="fedavg",
        description="the robust rules resist bad sites but need plaintext updates "
        "(secagg off)")
    trim_fraction: float = Field(
        default=0.1, ge=0.0, le=0.45,
        description="trimmed_mean: the share cut from each end, which bounds how many bad "
        "sites it tolerates")
    max_update_norm: float = Field(
        default=100.0, ge=0.0, le=1e12,
        description="L2 bound on a site's update (new minus global weights), to refuse a "
        "broken or hostile one; 0 = no bound. Far above an honest DP round's (README, "
        '"Bad updates")')


class SitePrivacyConfig(_Section):
    """The privacy settings a site can also set for itself (a site policy), as
    ``privacy.site.<site name>.<field>`` in simulation: a site may be stricter than the
    server asks, never looser."""

    enabled: bool = Field(
        default=True,
        description="DP-SGD at every site, on by default since it costs the default "
        "federation little holdout AUROC (README); --no-dp turns it off, with a warning "
        "every round")
    epsilon: float = Field(
        default=8.0, ge=1e-3, le=1000.0,
        description="each site's privacy budget for the whole run")
    delta: float = Field(
        default=1e-5, ge=1e-12, le=0.1,
        description="well below one over the number of patients at a site")
    max_grad_norm: float = Field(
        default=1.0, ge=1e-4, le=1000.0,
        description="per-example gradient clipping bound; the noise scales with it")
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp",
        description="rdp is the common standard; prv gives tighter epsilon bounds")
    max_noise_multiplier: float = Field(
        default=50.0, ge=0.1, le=1000.0,
        description="a budget that would need more noise is refused rather than training "
        "on noise; full-batch rounds spread σ over every patient of a site, so at ε = 1 "
        "they need σ near 25 and still learn (the expected signal-to-noise figure, not σ "
        "alone, says when noise swamps a site)")
    secure_aggregation: Literal["required", "optional"] = Field(
        default="required",
        description="required: the site never answers a plaintext train request, so a "
        "server cannot get its update by leaving secure aggregation out")
    min_threshold: int = Field(
        default=0, ge=0, le=100_000,
        description="the smallest secure-aggregation threshold the site accepts; 0: the "
        "protocol's floor, more than half of each share group")
    min_cohort: int = Field(
        default=3, ge=1, le=100_000,
        description="the fewest sites, itself included, whose updates must be summed with "
        "its own; with 2, each site can subtract its update from the sum and read the "
        "other's, and 1 lets the server see the update alone (both allowed, with a "
        "warning)")
    noise: Literal["local", "distributed"] = Field(
        default="local",
        description="local: each site's update carries all the DP noise (DP-SGD), private "
        "whoever sees it; distributed: each site adds only its share inside secure "
        "aggregation, so the sum carries the full noise and the model much less "
        "(needs train.full_batch, one local epoch and plain SGD; README, Privacy)")
    colluders: int = Field(
        default=0, ge=0, le=100_000,
        description="distributed noise only: how many other sites of a sum may share "
        "their noise shares with the server; the site adds enough for the guarantee to "
        "survive them")
    approved_encoders: tuple[str, ...] = Field(
        default=(),
        description="the encoder code this site runs besides the built-in encoders: "
        "digests printed by `mmfed app hash --encoder ENTRY`, each binding an entry point "
        "to its package's source; a run naming any other is declined. Only the site's own "
        "value counts: a server cannot approve code for a site (a simulation approves the "
        "encoders it names unless a site sets its own list)")

    @field_validator("approved_encoders")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [d for d in value if not re.fullmatch(r"[0-9a-f]{64}", d)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an encoder digest (64 hex digits, from "
                             "`mmfed app hash --encoder ENTRY`)")
        return value


class PrivacyConfig(SitePrivacyConfig):
    """Differential privacy at the sites (the server's request), plus settings that are
    not a site's policy."""

    grad_sample_mode: Literal["ghost", "hooks"] = Field(
        default="hooks",
        description="ghost clipping saves memory and falls back to hooks where "
        "unsupported")
    debug_seeded_noise: bool = Field(
        default=False,
        description="simulation only, for debugging: DP noise drawn from the run seed, "
        "which the coordinator knows, so it protects nothing; a deployed site refuses it")
    ledger_dir: str = Field(
        default="",
        description="where spent budgets are kept across runs; empty: $MMFED_LEDGER_DIR, "
        "else ~/.mmfed/privacy-ledger")


class SecAggConfig(_Section):
    """Secure aggregation: the server sees only the sum of the sites' updates."""

    enabled: bool = Field(
        default=True,
        description="on by default, so no single site's update is ever visible to the "
        "server")
    threshold: int = Field(
        default=0, ge=0, le=100_000,
        description="shares needed to remove a dropped site's mask; 0: more than half of "
        "each share group")
    neighbours: int = Field(
        default=0, ge=0, le=100_000,
        description="sites each site masks with, fewer being cheaper in large federations; "
        "0: every site (SecAgg)")
    clip_range: float = Field(
        default=1.0, ge=1e-6, le=1e6,
        description="per-coordinate clipping of updates, so they fit the quantization grid")
    count_cap: int = Field(
        default=10000, ge=1, le=1_000_000,
        description="example counts are sent as n / count_cap, inside the quantized range")


class FaultsConfig(_Section):
    """Fault injection for drills: failures on purpose, to test recovery."""

    drop: tuple[str, ...] = Field(
        default=(),
        description='"site-name:round:stage": the site fails at that stage (train, share, '
        "mask or unmask)")
    corrupt: tuple[str, ...] = Field(
        default=(),
        description='"site-name:round:kind": the site sends a bad update (kind nan, shape '
        "or huge)")

    @field_validator("drop")
    @classmethod
    def _drop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _site_round_entries(value, _STAGES, "site:round:stage with stage "
                                   f"{', '.join(_STAGES[:-1])} or {_STAGES[-1]}")

    @field_validator("corrupt")
    @classmethod
    def _corrupt(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _site_round_entries(value, _CORRUPTIONS, "site:round:kind with kind "
                                   f"{', '.join(_CORRUPTIONS[:-1])} or {_CORRUPTIONS[-1]}")


class RunSchema(_Section):
    """A whole run: the top-level keys, then one section per table."""

    seed: int = Field(
        default=0, ge=0, le=2**31 - 1,
        description="one seed for data, model and training, so a run can be repeated")
    rounds: int = Field(
        default=5, ge=1, le=10_000,
        description="federated rounds; DP-SGD spends the budget across all of them")
    out: str = Field(
        default="",
        description="the run directory; empty: runs/<command>-<time>")
    run_id: str = Field(
        default="",
        description="set when the run directory is created; it names the run in the "
        "sites' privacy ledgers")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    simulation: SimulationConfig = SimulationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secagg: SecAggConfig = SecAggConfig()
    faults: FaultsConfig = FaultsConfig()


# The ml code's names for the sections it takes (and ``ModelSpec()`` gives the defaults).
ModelSpec = ModelConfig
TrainSpec = TrainConfig


def _plain(value: Any) -> Value:
    """Schema value to flat value: lists are lists, as TOML and the tests see them."""
    return list(value) if isinstance(value, tuple) else value


def _index(model: type[_Section], prefix: str = "") -> dict[str, tuple[type[_Section], str]]:
    """Flat key -> (the model that declares it, its field name there)."""
    keys: dict[str, tuple[type[_Section], str]] = {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, _Section):
            keys.update(_index(sub, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = (model, name)
    return keys


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys (the way Flower flattens its run config)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, BaseModel):
            flat.update(flatten(dict(value), name + "."))
        else:
            flat[name] = _plain(value)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested tables, for writing TOML (no key is both a value and a
    table in this key space)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, name = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return tree


_FIELDS = _index(RunSchema)
DEFAULTS: dict[str, Value] = flatten(dict(RunSchema()))
# Per-site policies in simulation: privacy.site.<site name>.<field>, e.g.
# privacy.site.site-3.epsilon = 1.0.
SITE_POLICY_FIELDS: tuple[str, ...] = tuple(SitePrivacyConfig.model_fields)
_SITE_KEY = re.compile(r"^privacy\.site\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.([a-z_]+)$")


def _field_of(key: str) -> tuple[type[_Section], str] | None:
    """The model and field that validate ``key`` (its own, or a site policy field)."""
    if key in _FIELDS:
        return _FIELDS[key]
    match = _SITE_KEY.match(key)
    if match and match.group(2) in SITE_POLICY_FIELDS:
        return SitePrivacyConfig, match.group(2)
    return None


def _kind(model: type[_Section], name: str) -> type:
    """The flat value's Python type: what a TOML file or Flower must hand over."""
    annotation = model.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        return type(get_args(annotation)[0])
    if get_origin(annotation) is tuple:
        return list
    assert isinstance(annotation, type)
    return annotation


def _problem(model: type[_Section], name: str, error: Mapping[str, Any]) -> str:
    """pydantic's complaint, in the words users have always seen."""
    field = model.model_fields[name]
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    if get_origin(field.annotation) is Literal:
        return f"must be one of {', '.join(get_args(field.annotation))}"
    lo = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    if lo is not None and hi is not None:
        return f"must be between {lo:g} and {hi:g}"
    return " ".join(str(error["msg"]).split())


def check_value(label: str, model: type[_Section], name: str, value: Any) -> Value:
    """Check one value's type strictly (the schema's, but no bool for int and no text
    for numbers), then its bounds and pattern through the schema.

    ``label`` starts every message (``config key 'train.lr'``, or a policy file and
    field), so the run config and a site's policy file refuse values in the same words.
    """
    kind = _kind(model, name)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
            raise ConfigError(f"{label}: out of range (got a "
                              f"{value.bit_length()}-bit integer)")
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        if isinstance(value, str):  # Flower's run config has no lists: accept "a,b"
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{label}: expected {kind.__name__}, got {value!r}")
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if any("\ud800" <= c <= "\udfff" for text in texts for c in text):
        # undecodable command-line bytes arrive as lone surrogates: unwritable as TOML
        raise ConfigError(f"{label}: not valid UTF-8 text (got {value!r})")
    try:
        checked = model.model_validate({name: value})
    except ValidationError as exc:
        problem = _problem(model, name, exc.errors()[0])
        raise ConfigError(f"{label}: {problem} (got {value!r})") from None
    return _plain(getattr(checked, name))


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
    """A validated, fully resolved configuration, as flat dotted keys."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values: dict[str, Value] = {k: list(v) if isinstance(v, list) else v
                                         for k, v in DEFAULTS.items()}
        for key, value in (values or {}).items():
            self.set(key, value)

    def set(self, key: str, value: Any) -> None:
        target = _field_of(key)
        if target is None:
            close = [k for k in DEFAULTS if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if not key.isprintable() or key != key.strip():  # "...epsilon\n" passes the regex
            raise ConfigError(f"config key {key!r}: unexpected whitespace or control "
                              "characters")
        self.values[key] = check_value(f"config key '{key}'", *target, value)

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
            for key, value in flatten(tree).items():
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
        """The run's ``config.toml``: loading it gives this configuration back."""
        return "# mmfed resolved run configuration\n" + tomli_w.dumps(unflatten(self.values))

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

    def _section(self, name: str, model: type[_Section]) -> dict[str, Value]:
        return {field: self.values[f"{name}.{field}"] for field in model.model_fields}

    def model_spec(self) -> ModelSpec:
        return ModelConfig.model_validate(self._section("model", ModelConfig))

    def train_spec(self) -> TrainSpec:
        return TrainConfig.model_validate(self._section("train", TrainConfig))


def flower_app_config() -> dict[str, bool | int | float | str]:
    """What ``[tool.flwr.app.config]`` declares: every key, because Flower refuses
    ``--run-config`` overrides of keys the app does not declare."""
    return {**RunConfig().to_flower(), "out": FLWR_RUN_OUT}


def flower_config_toml() -> str:
    """``[tool.flwr.app.config]`` for pyproject.toml, so nobody writes it by hand."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": unflatten(
        flower_app_config())}}}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfed.config",
                                     description="Print what is derived from the schema.")
    parser.add_argument("--flower-config", action="store_true",
                        help="the [tool.flwr.app.config] table for pyproject.toml")
    args = parser.parse_args(argv)
    if not args.flower_config:
        parser.error("nothing to print: give --flower-config")
    sys.stdout.write(flower_config_toml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
