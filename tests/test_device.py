"""Device choice (train.device) and the Ray resources a simulation asks for.

These run on any machine: where a test needs "a machine with N CUDA GPUs" or "one
without", it says so to torch through monkeypatch, so CI never needs a GPU and a GPU
machine runs the same assertions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfed.config import RunConfig
from mmfed.errors import ConfigError
from mmfed.ml.device import resolve_device, simulation_gpus
from mmfed.simulate import ray_backend_config
from tests.helpers import run_mmfed


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_takes_cuda_when_present_and_cpu_otherwise(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit CPU stays the CPU


def test_missing_accelerators_are_one_line_config_errors(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    fake_gpus(monkeypatch, 0)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA GPU") as info:
            resolve_device(spec)
        assert "\n" not in str(info.value)
    fake_gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS"):
        resolve_device("mps")
    for bad in ("gpu", "cpu:1", "cuda:x", ""):
        with pytest.raises(ConfigError, match="must be auto, cpu"):
            resolve_device(bad)


def test_simulation_asks_ray_for_gpus_only_when_training_on_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    assert simulation_gpus("auto", 0.0, 16) == (0.0, 0)
    assert simulation_gpus("auto", 0.5, 16) == (0.0, 0)  # ignored on the CPU
    fake_gpus(monkeypatch, 1)
    assert simulation_gpus("cpu", 0.5, 16) == (0.0, 0)
    assert simulation_gpus("auto", 0.0, 16) == (0.0625, 1)  # shared by 16 concurrent sites
    assert simulation_gpus("cuda", 0.0, 3) == (0.3333, 1)  # rounded down: 3 still fit
    assert simulation_gpus("cuda", 0.5, 16) == (0.5, 1)  # as configured: 2 at once
    assert simulation_gpus("cuda:0", 0.5, 16) == (0.0, 1)  # pinned: every worker sees GPU 0


def test_ray_backend_config(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    backend = ray_backend_config(RunConfig({"simulation.cpus_per_site": 0.5}))
    assert backend["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert backend["init_args"]["num_cpus"] == 2 and backend["init_args"]["num_gpus"] == 0
    fake_gpus(monkeypatch, 1)
    backend = ray_backend_config(RunConfig({"simulation.cpus_per_site": 1.0}))
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert backend["init_args"]["num_gpus"] == 1
    with pytest.raises(ConfigError):
        ray_backend_config(RunConfig({"train.device": "cuda:3"}))


def test_training_runs_on_the_resolved_device(tmp_path: Path) -> None:
    """The plain and DP training paths take the device they are given (the CPU here;
    the same call runs on CUDA on a GPU machine: see benchmarks/README.md)."""
    from mmfed.config import ModelSpec, TrainSpec
    from mmfed.data.reader import load_site
    from mmfed.data.synth import SynthSettings, synthesize
    from mmfed.ml.features import encode, pooled_schema
    from mmfed.ml.model import build_model
    from mmfed.ml.training import evaluate, train_local
    from mmfed.privacy.dp_sgd import train_private

    synthesize(tmp_path, SynthSettings(sites=1, patients_per_site=40, holdout=20, seed=3,
                                       genes=20))
    site = load_site(tmp_path / "site-1")
    schema = pooled_schema([site])
    enc = encode(site, schema)
    device = resolve_device("auto")
    for private in (False, True):
        model = build_model(schema, ModelSpec(), seed=0)
        spec = TrainSpec(batch_size=16, device=str(device))
        if private:
            result = train_private(model, enc, spec, 2, 1.0, 1.0, seed=1, device=device)
            assert result.steps > 0
        else:
            assert train_local(model, enc, spec, 2, seed=1, device=device)["steps"] > 0
        assert {p.device for p in model.parameters()} == {device}
        assert evaluate(model, enc, device=device)["n"] == len(enc)


@pytest.mark.parametrize("command", ["simulate", "centralized"])
def test_cli_refuses_a_gpu_it_does_not_have_before_any_work(tmp_path: Path,
                                                            command: str) -> None:
    out = tmp_path / "run"
    proc = run_mmfed(command, "--out", out, "--set", "train.device=cuda:99", timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.device = 'cuda:99'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "data").exists()  # refused before synthesizing anything
