"""`mmfed simulate` on an existing Ray cluster: a head and one worker node on loopback.

Attaching to a cluster must not ask for resources (Ray refuses ``num_cpus`` then), the
site folders must be checked on every node up front, and the virtual sites must really
run on both nodes: each node has one CPU and each site asks for one, so Flower's two
actors can only be placed one per node, and Ray's state API says where they ran.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmfed.config import RunConfig
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.errors import DataError
from mmfed.simulate import check_cluster_reaches, ray_backend_config
from tests.helpers import run_mmfed

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The driver (mmfed simulate) is another process: it attaches by address.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def test_attaching_asks_for_no_cluster_resources() -> None:
    cfg = RunConfig.load(None, ["simulation.ray_address=10.0.0.5:6379"])
    backend = ray_backend_config(cfg)
    assert backend["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in backend["init_args"] and "num_gpus" not in backend["init_args"]
    assert backend["client_resources"]["num_cpus"] == 1.0
    local = ray_backend_config(RunConfig.load(None))
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] >= 1


def test_a_local_run_ignores_a_running_cluster(cluster: Cluster, tmp_path: Path) -> None:
    # The fixture's cluster is "the latest one started" (Ray records it, as `ray start`
    # does): a run without an address must still start its own Ray, with its own CPUs.
    data = tmp_path / "data"
    synthesize(data, SynthSettings(sites=3, patients_per_site=30, holdout=30, genes=20,
                                   image_size=16, seed=6))
    done = run_mmfed("simulate", "--data", data, "--rounds", "1", "--out", tmp_path / "run",
                     "--no-progress", "--no-dp", "--no-secagg", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_federation_runs_across_two_nodes(cluster: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, SynthSettings(sites=3, patients_per_site=40, holdout=40, genes=30,
                                   image_size=16, seed=5))
    run = tmp_path / "run"
    env_address = {"RAY_ADDRESS": cluster.address}
    os.environ.update(env_address)  # Ray's own convention, as a user would set it
    try:
        done = run_mmfed("simulate", "--data", data, "--rounds", "2", "--out", run,
                         "--no-progress", "--set", "train.batch_size=16", timeout=600)
    finally:
        os.environ.pop("RAY_ADDRESS")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(x["sites"]) == 3 for x in lines)
    assert all(s["status"] == "trained" for x in lines for s in x["sites"].values())

    # Both nodes did site work: Flower starts one actor per free CPU-per-site (two), and
    # with one CPU on each node Ray can only place them one per node.
    cpus = [n["Resources"].get("CPU", 0) for n in _alive_nodes(cluster.address)]
    assert cpus == [1.0, 1.0], cpus


def _alive_nodes(address: str) -> list[dict[str, object]]:
    import subprocess
    import sys

    code = (f"import json, ray; ray.init(address={address!r}, logging_level='error'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_folder_some_node_cannot_read_is_one_line(cluster: Cluster, tmp_path: Path) -> None:
    # Both nodes run on this machine, so "a folder the nodes cannot see" is one that
    # does not exist: the check runs on every node and must name one of them.
    present = tmp_path / "site-1"
    present.mkdir()
    (present / "site.toml").write_text("")
    check_cluster_reaches(cluster.address, [present])  # readable everywhere: no error
    ray.shutdown()
    with pytest.raises(DataError, match=r"^Ray node \S+ cannot read 1 site folder\(s\), "
                       r"e\.g\. .*site-2: every node must see"):
        check_cluster_reaches(cluster.address, [present, tmp_path / "site-2"])
    assert not ray.is_initialized()


def test_no_cluster_at_the_address_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, SynthSettings(sites=3, patients_per_site=20, holdout=20, genes=10,
                                   image_size=16, seed=5))
    done = run_mmfed("simulate", "--data", data, "--rounds", "1", "--out", tmp_path / "r",
                     "--no-progress", "--set", "simulation.ray_address=127.0.0.1:1",
                     timeout=300)
    assert done.returncode != 0
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot attach to the Ray cluster at '127.0.0.1:1'" in err[0], \
        done.stderr[-2000:]
