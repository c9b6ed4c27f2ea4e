"""What a site approves: the app hash, the allowlist, and the node's refusal before any
of a refused app's code is imported (the e2e test ``tests/e2e/test_site_trust.py``
mounts the attack over the network)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.cli.build import build_fab_from_disk

from mmfed.config import RunConfig
from mmfed.deploy.release import (
    Approval,
    approval_from_mapping,
    content_hash,
    fab_hash,
    installed_app_hash,
    load_approval,
    path_hash,
)
from mmfed.deploy.server import app_pyproject
from mmfed.errors import ConfigError


def deployment_app(folder: Path, overrides: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    cfg = RunConfig.load(overrides=overrides or [])
    (folder / "pyproject.toml").write_text(app_pyproject(cfg), encoding="utf-8")
    return folder


def test_the_app_mmfed_server_ships_is_the_installed_release(tmp_path: Path) -> None:
    app = deployment_app(tmp_path / "a")
    assert path_hash(app) == installed_app_hash()
    # the run config is the site policy's business, not the code's
    other = deployment_app(tmp_path / "b", ["rounds=9", "privacy.epsilon=2.0"])
    assert path_hash(other) == installed_app_hash()


def test_a_fab_and_its_folder_hash_the_same(tmp_path: Path) -> None:
    app = deployment_app(tmp_path / "a")
    (app / "extra.py").write_text("X = 1\n", encoding="utf-8")
    fab = build_fab_from_disk(app)
    (tmp_path / "app.fab").write_bytes(fab)
    assert fab_hash(fab) == path_hash(app) == path_hash(tmp_path / "app.fab")


def test_any_code_change_changes_the_hash(tmp_path: Path) -> None:
    base = (tmp_path / "pyproject.toml")
    base.write_text(app_pyproject(RunConfig.load()), encoding="utf-8")
    files = {"pyproject.toml": base.read_bytes()}
    reference = content_hash(files)
    assert content_hash({**files, "probe.py": b"import os\n"}) != reference
    assert content_hash({**files, "mmfed/site/app.py": b""}) != reference  # shadowing
    swapped = base.read_text().replace("mmfed.site.app:app", "probe:app").encode()
    assert content_hash({"pyproject.toml": swapped}) != reference
    stamped = base.read_text().replace('code = "', 'code = "0').encode()
    assert content_hash({"pyproject.toml": stamped}) != reference  # another release
    assert content_hash({**files, ".info/CONTENT": b"anything"}) == reference


def test_approval_defaults_and_allowlist() -> None:
    mine = installed_app_hash()
    other = hashlib.sha256(b"other release").hexdigest()
    assert Approval().check(mine) is None
    reason = Approval().check(other)
    assert reason is not None and other[:12] in reason and "not approved" in reason
    assert Approval((other,)).check(other) is None
    assert Approval((other,), trust_installed=False).check(mine) is not None


@pytest.mark.parametrize(("table", "needle"), [
    ({"approved": "abc"}, "must be a list"),
    ({"approved": ["abc"]}, "is not an app hash"),
    ({"approved": ["A" * 64]}, "is not an app hash"),
    ({"trust_installed": "yes"}, "true or false"),
    ({"trust_installed": False}, "approves no app at all"),
    ({"allow": []}, "unknown key"),
])
def test_bad_apps_tables_are_refused(table: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        approval_from_mapping(table, "policy.toml")


def test_policy_file_with_apps_table(tmp_path: Path) -> None:
    from mmfed.privacy.policy import load_policy

    digest = "ab" * 32
    path = tmp_path / "policy.toml"
    path.write_text(f'epsilon = 3.0\n\n[apps]\napproved = ["{digest}"]\n', encoding="utf-8")
    assert load_policy(path).epsilon == 3.0
    assert load_approval(path).approved == (digest,)
    assert load_approval(None) == Approval()


def test_not_a_fab_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Flower app archive"):
        fab_hash(b"PK\x03\x04 definitely not a zip")
    buffer = tmp_path / "no-pyproject.fab"
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.py", "")
    with pytest.raises(ConfigError, match=r"no pyproject\.toml"):
        fab_hash(buffer.read_bytes())


def test_app_hash_command(tmp_path: Path) -> None:
    app = deployment_app(tmp_path / "a")
    run = [sys.executable, "-m", "mmfed.cli", "app", "hash"]
    done = subprocess.run([*run, str(app)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[0] == installed_app_hash()
    done = subprocess.run([*run, "--installed"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[0] == installed_app_hash()
    done = subprocess.run([*run, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == \
        f"mmfed: error: {tmp_path / 'missing'}: no such file or folder"


class FakeFleet:
    """Flower's get_run / get_fab as the node sees them, serving one FAB."""

    def __init__(self, fab: bytes, announced: str | None = None) -> None:
        self.fab = fab
        self.announced = announced or hashlib.sha256(fab).hexdigest()

    def get_run(self, run_id: int) -> SimpleNamespace:
        return SimpleNamespace(fab_hash=self.announced, series_id=0, fab_id="x",
                               fab_version="1", override_config={})

    def get_fab(self, digest: str, run_id: int) -> SimpleNamespace:
        return SimpleNamespace(content=self.fab, hash_str=digest)


def node_for(tmp_path: Path, policy_text: str = "") -> object:
    from mmfed.deploy.node import NodePlan, SiteNode

    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text, encoding="utf-8")
    return SiteNode(NodePlan("site-1", str(tmp_path), "127.0.0.1:1", None, None, str(policy),
                             str(tmp_path / "privacy")))


def test_node_decides_per_run_before_running_anything(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfed.deploy.node import SiteNode

    good = build_fab_from_disk(deployment_app(tmp_path / "good"))
    bad_dir = deployment_app(tmp_path / "bad")
    (bad_dir / "probe.py").write_text("raise SystemExit('imported!')\n", encoding="utf-8")
    bad = build_fab_from_disk(bad_dir)
    node = node_for(tmp_path)
    assert isinstance(node, SiteNode)
    imported_before = set(sys.modules)
    ok = node.run_for(1, FakeFleet(good).get_run, FakeFleet(good).get_fab)
    assert ok.refusal is None and ok.app_hash == installed_app_hash()
    assert ok.context.run_config["rounds"] == RunConfig.load()["rounds"]
    refused = node.run_for(2, FakeFleet(bad).get_run, FakeFleet(bad).get_fab)
    assert refused.refusal is not None and "not approved" in refused.refusal
    assert refused.context.run_config == {}
    assert "probe" not in sys.modules and "probe" not in set(sys.modules) - imported_before
    swapped = FakeFleet(bad, announced=hashlib.sha256(good).hexdigest())
    tampered = node.run_for(3, swapped.get_run, swapped.get_fab)
    assert tampered.refusal == "the app received does not match the hash the server announced"
    # decided once per run: the FAB is not fetched again for the run's next messages
    monkeypatch.setattr(FakeFleet, "get_fab", lambda *a: pytest.fail("fetched again"))
    assert node.run_for(1, FakeFleet(good).get_run, FakeFleet(good).get_fab) is ok
    # an operator who reviewed the probe app can approve exactly it
    approving = node_for(tmp_path, f'[apps]\napproved = ["{fab_hash(bad)}"]\n')
    assert isinstance(approving, SiteNode)
    monkeypatch.undo()
    assert approving.run_for(2, FakeFleet(bad).get_run, FakeFleet(bad).get_fab).refusal is None
