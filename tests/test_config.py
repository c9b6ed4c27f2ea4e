"""The run configuration: one flat, typed, validated key space (file, --set, Flower).

Every test goes through the public entry points (``RunConfig.load``, ``RunConfig``,
``to_toml``/``to_flower``/``from_flower`` and the ``mmfed`` command line) with real
files in ``tmp_path``.
"""

from __future__ import annotations

import tomllib
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mmfed import config
from mmfed.cli import main
from mmfed.config import DEFAULTS, ModelSpec, RunConfig, RunSchema, TrainSpec
from mmfed.errors import ConfigError
from mmfed.ml.model import MODALITY_NAMES

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def non_default() -> RunConfig:
    """A configuration where every key differs from its default (types preserved)."""
    cfg = RunConfig({
        "seed": 7, "rounds": 3, "data.dir": 'C:\\fed\\"quoted" é', "data.sites": 4,
        "data.patients_per_site": 50, "data.holdout": 60, "data.genes": 40,
        "data.patient_missing": 0.25, "data.val_fraction": 0.2, "model.fusion": "concat",
        "model.embed_dim": 12, "model.hidden": 24, "model.dropout": 0.0,
        "model.image_channels": 6, "model.cat_embed_dim": 3, "model.genomics_hidden": 6,
        "model.genomics_dropout": 0.5, "train.local_epochs": 2, "train.batch_size": 8,
        "train.lr": 1e-7, "train.weight_decay": 0.0, "train.class_weighting": "none",
        "train.modalities": ["genomics", "records"], "federation.fraction_train": 0.5,
        "federation.min_sites": 2, "federation.round_timeout": 30.5,
        "federation.local_eval": False, "simulation.cpus_per_site": 0.5,
        "simulation.gpus_per_site": 0.25, "simulation.ray_address": "10.0.0.5:6379",
        "out": "runs/x y\tz", "run_id": "abc123", "privacy.enabled": False,
        "privacy.epsilon": 3.5, "privacy.delta": 1e-7, "privacy.max_grad_norm": 0.5,
        "privacy.accountant": "prv", "privacy.max_noise_multiplier": 4.0,
        "privacy.grad_sample_mode": "ghost", "privacy.secure_aggregation": "optional",
        "privacy.min_threshold": 3, "privacy.min_cohort": 5,
        "privacy.debug_seeded_noise": True,
        "privacy.ledger_dir": "/tmp/ledger dir",
        "privacy.site.site-2.epsilon": 1.0, "secagg.enabled": False, "secagg.threshold": 3,
        "secagg.neighbours": 4, "secagg.clip_range": 0.5, "secagg.count_cap": 500,
        "faults.drop": ["site-1:2:mask"], "faults.corrupt": ["site-2:1:nan"],
        "train.modality_dropout": 0.3, "train.device": "cuda:1",
        "aggregation.modality_aware": False, "aggregation.rule": "median",
        "aggregation.trim_fraction": 0.2, "model.missing": "zero_fill",
        "data.missing": ["genomics@site-2"], "aggregation.max_update_norm": 50.0,
        "train.optimizer": "sgd", "train.full_batch": True, "privacy.noise": "distributed",
        "privacy.colluders": 1, "model.image_encoder": "pkg.mod:enc",
        "model.record_encoder": "pkg.mod:rec", "model.genomic_encoder": "pkg:gen",
        "privacy.approved_encoders": ["ab" * 32],
    })
    assert all(cfg[k] != v for k, v in DEFAULTS.items()), "helper must change every key"
    return cfg


# --------------------------------------------------------------------------- defaults


def test_defaults_are_valid_and_complete() -> None:
    cfg = RunConfig()
    assert cfg.values == DEFAULTS
    # Re-setting every default through validation must succeed unchanged.
    assert RunConfig(dict(DEFAULTS)).values == DEFAULTS
    assert cfg["train.modalities"] == list(MODALITY_NAMES)
    assert cfg.model_spec().fusion == "gated"
    assert cfg.train_spec().modalities == MODALITY_NAMES


def test_defaults_and_specs_come_from_the_schema() -> None:
    assert DEFAULTS == config.flatten(dict(RunSchema()))
    assert list(DEFAULTS) == list(schema_fields())
    assert config.SITE_POLICY_FIELDS == ("enabled", "epsilon", "delta", "max_grad_norm",
                                         "accountant", "max_noise_multiplier",
                                         "secure_aggregation", "min_threshold", "min_cohort",
                                         "noise", "colluders", "approved_encoders")
    # The specs are the validated sections themselves, and their no-argument
    # construction gives the run's defaults (tests and benchmarks rely on it).
    assert RunConfig().model_spec() == ModelSpec()
    assert RunConfig().train_spec() == TrainSpec()
    assert isinstance(RunConfig().model_spec(), config.ModelConfig)
    assert hash(ModelSpec()) == hash(RunConfig().model_spec())  # frozen, hashable
    for key, (model, name) in schema_fields().items():
        assert model.model_fields[name].description, f"{key} has no description"


def schema_fields() -> dict[str, tuple[type[BaseModel], str]]:
    """Every key of the schema -> (the model that declares it, its field name)."""
    keys: dict[str, tuple[type[BaseModel], str]] = {}
    for name, field in RunSchema.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.update({f"{name}.{inner}": (sub, inner) for inner in sub.model_fields})
        else:
            keys[name] = (RunSchema, name)
    return keys


def test_former_hidden_model_fields_are_config_keys() -> None:
    cfg = RunConfig.load(None, ["model.cat_embed_dim=6", "model.genomics_hidden=12",
                                "model.genomics_dropout=0.5"])
    spec = cfg.model_spec()
    assert (spec.cat_embed_dim, spec.genomics_hidden, spec.genomics_dropout) == (6, 12, 0.5)
    assert (ModelSpec().cat_embed_dim, ModelSpec().genomics_hidden,
            ModelSpec().genomics_dropout) == (4, 4, 0.8)
    for bad in ("model.cat_embed_dim=0", "model.genomics_hidden=0",
                "model.genomics_dropout=0.95"):
        with pytest.raises(ConfigError, match="between"):
            RunConfig.load(None, [bad])


def test_train_spec_epochs_is_local_epochs() -> None:
    spec = RunConfig.load(None, ["train.local_epochs=3"]).train_spec()
    assert spec.epochs == spec.local_epochs == 3
    assert TrainSpec(epochs=2).local_epochs == 2
    # what the centralized baseline does to train one epoch at a time
    one = type(spec)(**{**spec.__dict__, "epochs": 1})
    assert one.epochs == 1 and one.batch_size == spec.batch_size
    with pytest.raises(ValueError):  # frozen: a spec cannot change under training
        spec.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("item", "message"), [
    ("train.lr=50", "config key 'train.lr': must be between 1e-07 and 10 (got 50.0)"),
    ("seed=-1", "config key 'seed': must be between 0 and 2.14748e+09 (got -1)"),
    ("train.lr=abc", "config key 'train.lr': expected float, got 'abc'"),
    ("model.fusion=sum", "config key 'model.fusion': must be one of concat, gated "
     "(got 'sum')"),
    ("train.device=gpu", "config key 'train.device': must be auto, cpu, cuda, cuda:N or "
     "mps (got 'gpu')"),
    ('data.missing=["records@site-1"]', "config key 'data.missing': each entry must be "
     "MODALITY@SITE with MODALITY images or genomics (got ['records@site-1'])"),
    ('faults.corrupt=["s:1:zero"]', "config key 'faults.corrupt': each entry must be "
     "site:round:kind with kind nan, shape or huge (got ['s:1:zero'])"),
    ("train.modalities=[]", "config key 'train.modalities': must be a non-empty list of "
     "distinct records, images, genomics (got [])"),
])
def test_schema_errors_read_as_before(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, [item])
    assert str(info.value) == message
    # pydantic's own error is translated, not chained: no "During handling..." block
    assert "ValidationError" not in "".join(traceback.format_exception(info.value))


# --------------------------------------------------------------------------- TOML files


def test_toml_file_with_nested_tables_loads(tmp_path: Path) -> None:
    path = write(tmp_path / "run.toml", """
seed = 11
rounds = 2

[data]
sites = 2
val_fraction = 0.1

[model]
fusion = "concat"

[train]
lr = 0.01
modalities = ["records", "genomics"]
""")
    cfg = RunConfig.load(path)
    assert cfg["seed"] == 11
    assert cfg["rounds"] == 2
    assert cfg["data.sites"] == 2
    assert cfg["data.val_fraction"] == pytest.approx(0.1)
    assert cfg["model.fusion"] == "concat"
    assert cfg["train.lr"] == pytest.approx(0.01)
    assert cfg["train.modalities"] == ["records", "genomics"]
    assert cfg["train.batch_size"] == DEFAULTS["train.batch_size"]  # untouched keys default


def test_toml_dotted_keys_and_bom_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes("\ufefftrain.lr = 0.02\nmodel.hidden = 8\n".encode())
    cfg = RunConfig.load(path)
    assert cfg["train.lr"] == pytest.approx(0.02)
    assert cfg["model.hidden"] == 8


def test_precedence_file_then_extra_then_set(tmp_path: Path) -> None:
    path = write(tmp_path / "run.toml", "seed = 1\nrounds = 2\n[train]\nlr = 0.01\n")
    cfg = RunConfig.load(path, ["rounds=4"], {"seed": 3, "rounds": 9, "data.dir": None})
    assert cfg["seed"] == 3  # explicit flag beats the file
    assert cfg["rounds"] == 4  # --set beats both
    assert cfg["train.lr"] == pytest.approx(0.01)
    assert cfg["data.dir"] == ""  # None means "flag not given"


@pytest.mark.parametrize("text", [
    "seed = \n",
    "[train\nlr = 0.1\n",
    "rounds = 5\nrounds = 6\n",
    "model.fusion = 'gated\n",
])
def test_invalid_toml_is_one_line_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "Traceback" not in msg
    assert str(path) in msg
    assert "not valid TOML" in msg


def test_missing_and_binary_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "nope.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError) as info:
        RunConfig.load(binary)
    assert "\n" not in str(info.value)


def test_bad_value_in_toml_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "run.toml", '[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"train\.lr"):
        RunConfig.load(path)
    path = write(tmp_path / "run2.toml", "[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        RunConfig.load(path)


# --------------------------------------------------------------------------- --set


def test_set_overrides_parse_toml_values_and_bare_words() -> None:
    cfg = RunConfig.load(None, ["train.lr=0.01", "model.fusion=concat",
                                'train.modalities=["records"]', "rounds = 7",
                                "federation.local_eval=false", "data.dir=/data/fed-1"])
    assert cfg["train.lr"] == pytest.approx(0.01)
    assert isinstance(cfg["train.lr"], float)
    assert cfg["model.fusion"] == "concat"
    assert cfg["train.modalities"] == ["records"]
    assert cfg["rounds"] == 7
    assert cfg["federation.local_eval"] is False
    assert cfg["data.dir"] == "/data/fed-1"


def test_set_int_for_float_key_becomes_float() -> None:
    cfg = RunConfig.load(None, ["train.lr=1"])
    assert cfg["train.lr"] == 1.0
    assert isinstance(cfg["train.lr"], float)


@pytest.mark.parametrize(("item", "key", "expected"), [
    ("out=2024", "out", "2024"),
    ("data.dir=2024-01-01", "data.dir", "2024-01-01"),
])
def test_set_string_key_with_number_like_value(item: str, key: str, expected: str) -> None:
    assert RunConfig.load(None, [item])[key] == expected


def test_set_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        RunConfig.load(None, ["train.lr"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        RunConfig.load(None, ["=3"])


def test_unknown_key_is_named_with_hint() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, ["lr=0.1"])
    msg = str(info.value)
    assert "'lr'" in msg
    assert "did you mean train.lr" in msg
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, ["model.fusoin=concat"])
    assert "'model.fusoin'" in str(info.value)
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, ["nope=1"])
    assert "'nope'" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("item", [
    "rounds=five", "rounds=true", "rounds=2.5", "seed=\"3\"", "train.lr=\"0.1\"",
    "train.lr=true", "federation.local_eval=1", "data.genes=many", "train.modalities=[1, 2]",
])
def test_wrong_type_is_refused(item: str) -> None:
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'.*expected"):
        RunConfig.load(None, [item])


@pytest.mark.parametrize("item", [
    "train.lr=-1", "train.lr=0", "train.lr=nan", "train.lr=inf", "data.val_fraction=0.9",
    "rounds=0", "seed=-1", "model.fusion=attention", "train.class_weighting=auto",
    "train.modalities=[]", 'train.modalities=["records", "records"]',
    'train.modalities=["xray"]', "data.patients_per_site=5",
])
def test_out_of_range_is_refused(item: str) -> None:
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.load(None, [item])


def test_failed_set_leaves_previous_value() -> None:
    cfg = RunConfig({"train.lr": 0.02})
    with pytest.raises(ConfigError):
        cfg.set("train.lr", -1.0)
    assert cfg["train.lr"] == pytest.approx(0.02)


# --------------------------------------------------------------------------- round trips


def test_to_toml_round_trips(tmp_path: Path) -> None:
    for cfg in (RunConfig(), non_default()):
        path = write(tmp_path / "resolved.toml", cfg.to_toml())
        tomllib.loads(path.read_text(encoding="utf-8"))  # valid TOML on its own
        again = RunConfig.load(path)
        assert again.values == cfg.values
        for key, value in cfg.values.items():
            assert type(again[key]) is type(value), key


def test_flower_round_trip_including_list_key() -> None:
    for cfg in (RunConfig(), non_default(), RunConfig({"train.modalities": ["records"]})):
        flat = cfg.to_flower()
        for key, value in flat.items():
            assert isinstance(value, bool | int | float | str), key  # Flower-friendly
        assert isinstance(flat["train.modalities"], str)
        again = RunConfig.from_flower(flat)
        assert again.values == cfg.values
        assert again["train.modalities"] == cfg["train.modalities"]


def test_flower_round_trip_through_config_record() -> None:
    from flwr.app import ConfigRecord

    cfg = non_default()
    record = ConfigRecord(cfg.to_flower())
    assert RunConfig.from_flower(dict(record)).values == cfg.values


def test_pyproject_flower_app_config_is_accepted() -> None:
    """`flwr run .` hands the ServerApp these keys, flattened the way Flower does it."""
    from flwr.common.config import flatten_dict

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    flat = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert flat, "pyproject.toml has no [tool.flwr.app.config]"
    assert RunConfig.from_flower(flat).to_flower() == flat


def typed(flat: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    """Values with their types: 1 == 1.0 == True would hide a drifted type."""
    return {k: (type(v), v) for k, v in flat.items()}


def test_pyproject_flower_app_config_matches_the_schema() -> None:
    """Every schema key, with its Flower-flattened default (``out`` names a folder for
    ``flwr run .``). On failure: python -m mmfed.config --flower-config."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    declared = config.flatten(pyproject["tool"]["flwr"]["app"]["config"])
    expected = {**RunConfig().to_flower(), "out": "runs/flwr-run"}
    assert typed(declared) == typed(expected)
    assert config.flower_app_config() == expected


def test_flower_config_generator_prints_the_pyproject_table(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert config.main(["--flower-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert printed == {"tool": {"flwr": {"app": {
        "config": pyproject["tool"]["flwr"]["app"]["config"]}}}}


# --------------------------------------------------------------------------- command line


def test_cli_unknown_set_key_is_one_line_exit_1(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    code = main(["simulate", "--set", "nope=1", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mmfed: error: ")
    assert "nope" in lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_bad_config_file_is_one_line_exit_1(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[train\n")
    code = main(["simulate", "--config", str(path), "--out", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("mmfed: error: ")


def test_cli_bad_argument_type_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--rounds", "x"])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("mmfed: error: ")
    assert "--rounds" in err


def test_shipped_default_config_is_every_default() -> None:
    path = REPO / "configs" / "default.toml"
    assert RunConfig.load(path).values == DEFAULTS
    # every key written out (and so documented there), none left implicit, same types
    shipped = config.flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    assert typed(shipped) == typed(DEFAULTS)


def test_per_site_privacy_keys() -> None:
    cfg = RunConfig.load(None, ["privacy.site.site-2.epsilon=1.5",
                                "privacy.site.site-2.enabled=true"])
    assert cfg.site_privacy("site-2")["epsilon"] == 1.5
    assert cfg.site_privacy("site-1")["epsilon"] == DEFAULTS["privacy.epsilon"]
    for bad, needle in [("privacy.site.site-2.budget=1", "unknown config key"),
                        ("privacy.site.site-2.epsilon=-1", "between"),
                        ("privacy.site.../x.epsilon=1", "unknown config key"),
                        ("privacy.site.site-2.accountant=gdp", "one of")]:
        with pytest.raises(ConfigError, match=needle):
            RunConfig.load(None, [bad])


def test_fault_injection_entries_are_checked() -> None:
    assert RunConfig.load(None, ['faults.drop=["site-2:3:mask"]'])["faults.drop"] == [
        "site-2:3:mask"]
    for bad in ('faults.drop=["site-2"]', 'faults.drop=["site-2:x:mask"]',
                'faults.drop=["site-2:1:explode"]'):
        with pytest.raises(ConfigError, match="site:round:stage"):
            RunConfig.load(None, [bad])
