"""Bring your own encoder: the entry point, its checks, and the site's approval of its code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.config import RunConfig
from mmfed.errors import ConfigError, Declined
from mmfed.ml.encoders import check_private, encoder_digest
from mmfed.ml.features import pooled_schema
from mmfed.ml.model import ModelSpec, build_model
from tests.helpers import MMFED, run_mmfed

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "encoders"
MONAI = "monai_encoder:image_encoder"
SMALL = ["--set", "data.patients_per_site=60", "--set", "data.holdout=60",
         "--set", "data.genes=100"]

# A module that acts the moment it is imported: what a curious or malicious server would
# name as an "encoder" to run code on a site's data.
EVIL = textwrap.dedent("""
    from pathlib import Path
    Path(__file__).with_name("IMPORTED").write_text("ran at import")

    def factory(out_dim, schema):
        raise RuntimeError("never reached")
""")

# Encoders for the shape and layer checks: importable from this test's tmp folder.
PLUGINS = textwrap.dedent("""
    import torch
    from torch import nn

    class Wide(nn.Module):
        def __init__(self, out_dim):
            super().__init__()
            self.lin = nn.Linear(1, out_dim + 1)
        def forward(self, x):
            return self.lin(x.flatten(1).mean(1, keepdim=True))

    def wrong_width(out_dim, schema):
        return Wide(out_dim)

    def genomics(out_dim, schema):
        return nn.Sequential(nn.Linear(len(schema.genes), out_dim), nn.Tanh())

    def batchnorm_genomics(out_dim, schema):
        return nn.Sequential(nn.Linear(len(schema.genes), out_dim),
                             nn.BatchNorm1d(out_dim, affine=False), nn.Tanh())

    def lstm_records(out_dim, schema):
        class Rec(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(1, out_dim, batch_first=True)
            def forward(self, num, num_missing, cat):
                return self.rnn(num.unsqueeze(-1))[0][:, -1]
        return Rec()

    def broken(out_dim, schema):
        raise ValueError("no weights file here")

    def not_a_module(out_dim, schema):
        return 42
""")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmfed.data.synth import SynthSettings, synthesize

    root = tmp_path_factory.mktemp("fed")
    synthesize(root, SynthSettings(sites=1, patients_per_site=40, holdout=20, genes=30,
                                   image_size=32, seed=5))
    return root


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "byo_plugins.py").write_text(PLUGINS)
    pkg = tmp_path / "evil_encoder"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return tmp_path


def _schema(federation: Path):  # type: ignore[no-untyped-def]
    from mmfed.data import load_site

    return pooled_schema([load_site(federation / "site-1")])


def _spec(**encoders: str) -> ModelSpec:
    return ModelSpec(**encoders)


# --------------------------------------------------------------------------- checks


def test_monai_encoder_builds_and_passes_the_dp_check(federation: Path, plugins: Path) -> None:
    model = build_model(_schema(federation), _spec(image_encoder=MONAI), seed=0)
    assert any(k.startswith("images.net.") for k in model.state_dict())
    check_private(model)  # GroupNorm: no complaint
    x = torch.zeros(3, 1, 32, 32)
    assert model.images(x).shape == (3, ModelSpec().embed_dim)


def test_batchnorm_is_refused_under_dp_naming_the_layer(federation: Path,
                                                        plugins: Path) -> None:
    schema = _schema(federation)
    model = build_model(schema, _spec(image_encoder="monai_encoder:batchnorm_image_encoder"))
    with pytest.raises(ConfigError) as err:
        check_private(model)
    message = str(err.value)
    assert "\n" not in message
    assert "model.image_encoder" in message and "BatchNorm2d" in message
    assert "'images.net." in message  # the layer's own name, to find it in the network
    # an affine-free BatchNorm has nothing to train, so Opacus's validator misses it
    model = build_model(schema, _spec(genomic_encoder="byo_plugins:batchnorm_genomics"))
    with pytest.raises(ConfigError, match=r"model.genomic_encoder: layer 'genomics.1' "
                                          r"\(BatchNorm1d\)"):
        check_private(model)


def test_opacus_validator_findings_name_the_layer(federation: Path, plugins: Path) -> None:
    model = build_model(_schema(federation), _spec(record_encoder="byo_plugins:lstm_records"))
    with pytest.raises(ConfigError, match=r"model.record_encoder: layer 'records.rnn' "
                                          r"\(LSTM\) is refused with DP on"):
        check_private(model)


@pytest.mark.parametrize(("entry", "needle"), [
    ("byo_plugins:wrong_width", "gives (2, 9) for a batch of 2; the fusion needs (2, 8)"),
    ("byo_plugins:broken", "the factory failed (ValueError: no weights file here)"),
    ("byo_plugins:not_a_module", "returned int, not a torch.nn.Module"),
    ("byo_plugins:missing", "cannot load it (AttributeError"),
    ("no_such_package_xyz:f", "cannot load it (ModuleNotFoundError"),
])
def test_bad_encoders_are_one_line_config_errors(federation: Path, plugins: Path,
                                                 entry: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(_schema(federation), _spec(image_encoder=entry))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"model.image_encoder {entry!r}")


def test_entry_point_syntax_is_checked_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"model\.image_encoder"):
        RunConfig.load(None, ["model.image_encoder=os.system('x')"])
    with pytest.raises(ConfigError, match="approved_encoders"):
        RunConfig.load(None, ["privacy.approved_encoders=abc"])
    cfg = RunConfig.load(None, ["model.genomic_encoder=pkg.mod:make.encoder"])
    assert cfg.model_spec().genomic_encoder == "pkg.mod:make.encoder"


def test_custom_genomic_encoder_trains(federation: Path, plugins: Path) -> None:
    """The custom module is part of the model that is trained and sent: its weights move."""
    from mmfed.site import runtime as site_runtime

    schema = _schema(federation)
    entry = "byo_plugins:genomics"
    cfg = RunConfig({"privacy.enabled": False, "train.local_epochs": 1, "rounds": 1,
                     "model.genomic_encoder": entry,
                     "privacy.approved_encoders": [encoder_digest(entry)]})
    model = build_model(schema, cfg.model_spec(), seed=0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert "genomics.0.weight" in state
    out = site_runtime.train_round(federation / "site-1", cfg, schema, state, 1)
    assert out.state is not None
    assert not np.allclose(out.state["genomics.0.weight"], state["genomics.0.weight"])


# --------------------------------------------------------------------------- approval


def test_digest_binds_the_entry_point_and_its_code(plugins: Path) -> None:
    source = plugins / "byo_digest_only.py"  # never imported: found by its source alone
    source.write_text(PLUGINS)
    first = encoder_digest("byo_digest_only:genomics")
    assert first == encoder_digest("byo_digest_only:genomics")
    assert encoder_digest("byo_digest_only:batchnorm_genomics") != first  # other entry
    source.write_text(PLUGINS + "\n# a change\n")
    assert encoder_digest("byo_digest_only:genomics") != first
    assert "byo_digest_only" not in sys.modules
    with pytest.raises(ConfigError, match="no module 'nowhere_xyz' is installed"):
        encoder_digest("nowhere_xyz:f")


def test_site_declines_unapproved_encoder_before_importing_it(federation: Path,
                                                              plugins: Path) -> None:
    """The attack: a server names a module that runs code at import. The site's policy
    does not list it, so the site declines without importing it."""
    from mmfed.site import runtime as site_runtime

    entry = "evil_encoder:factory"
    schema = _schema(federation)
    state = {k: v.numpy() for k, v in build_model(schema, seed=0).state_dict().items()}
    cfg = RunConfig({"model.image_encoder": entry, "privacy.enabled": False})
    with pytest.raises(Declined, match=r"model.image_encoder 'evil_encoder:factory' \(code "
                                       r"[0-9a-f]{12}\) is not approved at this site"):
        site_runtime.train_round(federation / "site-1", cfg, schema, state, 1)
    assert not (plugins / "evil_encoder" / "IMPORTED").exists()
    assert "evil_encoder" not in sys.modules


def test_a_server_cannot_approve_code_for_a_deployed_site(federation: Path, plugins: Path,
                                                          tmp_path: Path) -> None:
    """The server's run config lists the digest; the site's own policy file does not."""
    from mmfed.site import runtime as site_runtime

    entry = "evil_encoder:factory"
    cfg = RunConfig({"model.image_encoder": entry,
                     "privacy.approved_encoders": [encoder_digest(entry)]})
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("epsilon = 4.0\n")
    policy = site_runtime.site_policy({"policy": str(policy_file)}, cfg, "site-1")
    assert policy.approved_encoders == ()
    with pytest.raises(Declined, match="not approved at this site"):
        site_runtime.check_encoders(policy, cfg)
    # the site's own approval, in its policy file, is what lets it run
    policy_file.write_text(f'epsilon = 4.0\napproved_encoders = ["{encoder_digest(entry)}"]\n')
    policy = site_runtime.site_policy({"policy": str(policy_file)}, cfg, "site-1")
    site_runtime.check_encoders(policy, cfg)  # approved: no refusal
    assert not (plugins / "evil_encoder" / "IMPORTED").exists()  # still not imported


def test_app_hash_prints_the_encoder_digest(plugins: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{REPO}"}
    proc = subprocess.run([*MMFED, "app", "hash", "--encoder", MONAI], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == encoder_digest(MONAI)
    proc = run_mmfed("app", "hash", "--encoder", "not an entry", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- end to end


def _simulate(out: Path, entry: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{REPO}"}
    return subprocess.run([*MMFED, "simulate", "--sites", "3", "--rounds", "2", "--seed", "3",
                           "--out", str(out), "--no-progress", *SMALL,
                           "--set", f"model.image_encoder={entry}", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_monai_encoder_trains_in_a_dp_secure_aggregation_simulation(tmp_path: Path) -> None:
    proc = _simulate(tmp_path / "run", MONAI)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"simulated sites approve model.image_encoder {MONAI}" in proc.stdout
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rounds) == 2
    for r in rounds:
        assert r["aggregation"]["secure"] and r["aggregation"]["private"]
        assert r["aggregation"]["participants"] == 3
        assert all(site["status"] == "trained" and site["epsilon"] > 0
                   for site in r["sites"].values())
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert any(k.startswith("images.net.") for k in saved["state_dict"])


@pytest.mark.slow
def test_batchnorm_encoder_simulation_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = _simulate(tmp_path / "run", "monai_encoder:batchnorm_image_encoder")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmfed: error: "), proc.stderr[-3000:]
    assert "BatchNorm2d" in err[0] and "refused with DP on" in err[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # refused before any round
    assert "Traceback" not in proc.stderr
