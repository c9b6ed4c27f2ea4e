"""A partner site runs only code it approved, and a key acts only as its own site.

Real processes over TLS with SuperNode authentication on loopback:

* **A modified app.** The coordinator ships its own Flower app: mmfed's components
  plus one extra module whose ClientApp lists the site folder and sends the listing
  back. On a stock Flower SuperNode that module runs next to the patient data (checked
  here in process: the payload really lists the folder). Every ``mmfed client`` refuses
  the run by the app's hash, before any of its code is imported; the server gets three
  error replies naming the hash, and no file name from any site folder reaches the
  server, its logs, or the run's output. The refusals are in each site's audit log.
* **Impersonation.** An admitted key (site-3's) presents a site folder that says
  "site-2". The server refuses that node by its key and logs it; the honest site-2
  and site-1 train as usual.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from mmfed.deploy.processes import free_port
from mmfed.deploy.release import deployment_pyproject, installed_app_hash, path_hash, short
from mmfed.privacy.audit import verify
from tests.e2e.harness import Harness, small_kit, wait_for_text, wait_until

pytestmark = pytest.mark.slow
SITES = ("site-1", "site-2", "site-3")
CONNECTION = "probe"

PROBE_CLIENT = '''
"""The payload a curious coordinator would like a site to run: list the site folder."""
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("probe")
def probe(msg: Message, context: Context) -> Message:
    folder = str(context.node_config.get("data-dir", "."))
    names = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    return Message(RecordDict({"probe": ConfigRecord({"files": names or ["(empty)"]})}),
                   reply_to=msg)
'''

PROBE_SERVER = '''
"""Ask every connected site to run the probe; write whatever comes back."""
import json
import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["sites"])
    deadline = time.time() + 120
    nodes = []
    while len(nodes) < want and time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    out = [Message(RecordDict(), node, "query.probe") for node in nodes]
    lines = []
    for reply in grid.send_and_receive(out, timeout=120):
        entry = {"node": reply.metadata.src_node_id}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            entry["files"] = list(reply.content.config_records["probe"]["files"])
        lines.append(json.dumps(entry))
    with open(context.run_config["out"], "w", encoding="utf-8") as fh:
        fh.write("\\n".join(lines) + "\\n")
'''


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_kit(tmp_path_factory.mktemp("trust-e2e"), SITES, seed=5)


def probe_app(folder: Path) -> Path:
    """mmfed's own deployment app, plus the probe module as its ClientApp."""
    import tomllib

    folder.mkdir()
    tree = tomllib.loads(deployment_pyproject({"out": "", "sites": 3}))
    tree["tool"]["flwr"]["app"]["components"] = {"serverapp": "probe_server:app",
                                                 "clientapp": "probe_client:app"}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(tree), encoding="utf-8")
    (folder / "probe_client.py").write_text(PROBE_CLIENT, encoding="utf-8")
    (folder / "probe_server.py").write_text(PROBE_SERVER, encoding="utf-8")
    return folder


def test_the_probe_lists_a_site_folder_where_flower_would_run_it(
        kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: run as Flower's SuperNode runs an app's ClientApp, the payload leaks
    the folder; so the refusal below is what protects the site."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    app = probe_app(tmp_path / "app")
    sys.path.insert(0, str(app))
    try:
        import probe_client
    finally:
        sys.path.remove(str(app))
    message = Message(RecordDict(), 1, "query.probe")
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(kit / "fed" / "site-1")},
                      state=RecordDict(), run_config={})
    reply = probe_client.app(message, context)
    files = list(reply.content.config_records["probe"]["files"])
    assert any(name.endswith("site.toml") for name in files), files


def test_a_modified_app_is_refused_at_every_site(kit: Path, tmp_path: Path) -> None:
    app = probe_app(tmp_path / "app")
    digest = path_hash(app)
    assert digest != installed_app_hash()
    h = Harness(tmp_path)
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    certs = kit / "certs"
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}",
                                            "root-certificates": str(certs / "ca.pem")}}}),
        encoding="utf-8")
    env = {"FLWR_HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    bindir = Path(sys.executable).parent
    out = tmp_path / "probe-out.jsonl"
    try:
        link = h.command("superlink", [
            str(bindir / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--ssl-ca-certfile", str(certs / "ca.pem"), "--ssl-certfile",
            str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth"], env=env)
        deadline = time.monotonic() + 90
        for site in SITES:  # the coordinator admits the sites' keys, as mmfed server does
            while True:
                done = subprocess.run(
                    [str(bindir / "flwr"), "supernode", "register",
                     str(kit / "keys" / f"{site}.pub"), CONNECTION, "--name", site],
                    env={**env, "FLWR_TELEMETRY_ENABLED": "0"}, capture_output=True,
                    timeout=60)
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            assert done.returncode == 0, done.stdout.decode()[-2000:]
        clients = [h.mmfed(site, "client", "--data", kit / "fed" / site, "--site", site,
                           "--server", f"127.0.0.1:{port}", "--ca", certs / "ca.pem",
                           "--key", kit / "keys" / f"{site}.key", "--ledger-dir",
                           tmp_path / f"privacy-{site}", "--wait-server", "60")
                   for site in SITES]
        for client in clients:
            wait_for_text(client, "connected to", 120)
        submit = h.command("flwr-run", [
            str(bindir / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config",
            f'out="{out}"'], env=env, cwd=app)
        wait_until(out.exists, 240, submit)
        submit.wait(60)
        for client in clients:
            assert h.stop(client) == 0, client.text()[-2000:]
        h.stop(link)
    finally:
        killed = h.cleanup()
    assert not killed
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(replies) == len(SITES), replies
    for reply in replies:
        assert "files" not in reply, reply
        assert f"refused the run: app {short(digest)} is not approved" in reply["error"]
    # nothing of any site folder reached the coordinator's side
    coordinator = out.read_text() + link.text() + submit.text()
    for site in SITES:
        for path in (kit / "fed" / site).rglob("*"):
            if path.is_file() and len(path.name) > 4:
                assert str(path) not in coordinator and f"/{path.name}" not in coordinator
    for site, client in zip(SITES, clients, strict=True):
        assert "REFUSED run" in client.text() and short(digest) in client.text()
        report = verify(tmp_path / f"privacy-{site}")
        assert report.ok, report.problems
        refused = [e for e in report_entries(tmp_path / f"privacy-{site}")
                   if e["kind"] == "refused"]
        assert refused and all(e["app_hash"] == digest for e in refused), refused


def report_entries(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


def test_an_admitted_key_cannot_act_as_another_site(kit: Path, tmp_path: Path) -> None:
    # site-3's key, with a copy of site-3's data that calls itself site-2
    impostor = tmp_path / "impostor"
    import shutil

    shutil.copytree(kit / "fed" / "site-3", impostor)
    toml = impostor / "site.toml"
    toml.write_text(toml.read_text().replace('"site-3"', '"site-2"'), encoding="utf-8")
    policy = tmp_path / "policy.toml"
    policy.write_text("enabled = true\nepsilon = 8.0\ndelta = 1e-5\nmin_cohort = 2\n",
                      encoding="utf-8")
    h = Harness(tmp_path)
    port = free_port()
    run = tmp_path / "run"
    try:
        server = h.mmfed("server", "server", "--data", kit / "fed", "--certs", kit / "certs",
                         "--admit", kit / "keys", "--host", "127.0.0.1", "--port", str(port),
                         "--out", run, "--rounds", "1", "--no-progress",
                         "--set", "train.batch_size=16", "--set", "federation.min_sites=2",
                         "--set", "privacy.min_cohort=2",
                         "--set", "federation.round_timeout=120")
        common = ["--server", f"127.0.0.1:{port}", "--ca", kit / "certs" / "ca.pem",
                  "--policy", policy, "--wait-server", "120"]
        fake = h.mmfed("impostor", "client", "--data", impostor, "--key",
                       kit / "keys" / "site-3.key", "--ledger-dir", tmp_path / "l-fake",
                       *common)
        wait_for_text(fake, "connected to", 180)  # in the federation before setup starts
        honest = [h.mmfed(site, "client", "--data", kit / "fed" / site, "--key",
                          kit / "keys" / f"{site}.key", "--ledger-dir",
                          tmp_path / f"l-{site}", *common) for site in ("site-1", "site-2")]
        server_code = server.wait(300)
        codes = [h.stop(c) for c in (*honest, fake)]
    finally:
        killed = h.cleanup()
    assert not killed
    assert server_code == 0, server.text()[-3000:]
    assert codes == [0, 0, 0]
    assert ("claims to be site 'site-2' but its key was admitted for 'site-3': refused as "
            "an impersonation attempt") in server.text()
    (line,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(line["sites"]) == {"site-1", "site-2"}
    assert all(s["status"] == "trained" for s in line["sites"].values()), line["sites"]
    # the impostor never trained: nothing was released from its data
    assert not [e for e in report_entries(tmp_path / "l-fake") if e["kind"] == "release"]
