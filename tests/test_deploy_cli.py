"""Deployment credentials and the refusals of `mmfed server` / `mmfed client`.

Credentials are checked the way they are used: the server certificate in a real TLS
handshake on loopback (the names it must and must not be valid for), the site keys
through the very loaders Flower 1.41 uses. The refusals run `mmfed.cli.main`
in-process (one real subprocess proves no traceback): every bad input stops the
command before any process starts, with one line and the right exit code.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mmfed.cli import main
from mmfed.data.synth import SynthSettings, synthesize
from mmfed.deploy.processes import free_port
from tests.helpers import QUIET

MMFED = [sys.executable, "-m", "mmfed.cli"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small federation, a certificate set and two site key pairs."""
    root = tmp_path_factory.mktemp("deploy")
    synthesize(root / "fed", SynthSettings(sites=2, patients_per_site=30, holdout=20, genes=20,
                                           seed=1, image_size=32))
    assert main(["certs", "init", "--out", str(root / "certs"), "--host", "fl.example.org",
                 "--host", "10.1.2.3"]) == 0
    for site in ("site-1", "site-2"):
        assert main(["keys", "new", "--site", site, "--out", str(root / "keys")]) == 0
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mmfed: error: "), err
    assert "Traceback" not in err
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- credentials


def test_certs_files_modes_and_names(kit: Path) -> None:
    certs = kit / "certs"
    assert mode(certs / "ca.key") == 0o600 and mode(certs / "server.key") == 0o600
    assert mode(certs / "ca.pem") == 0o644 and mode(certs / "server.pem") == 0o644
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3", "127.0.0.1", "::1"}


def _handshake(certs: Path, server_name: str, ca: Path) -> None:
    """A TLS server with server.pem on loopback; a client verifying it as `server_name`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                client_ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("name", ["fl.example.org", "10.1.2.3", "127.0.0.1", "localhost"])
def test_server_certificate_verifies_for_its_names(kit: Path, name: str) -> None:
    _handshake(kit / "certs", name, kit / "certs" / "ca.pem")


def test_server_certificate_refused_for_other_names_and_other_cas(kit: Path,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(kit / "certs", "evil.example.org", kit / "certs" / "ca.pem")
    assert main(["certs", "init", "--out", str(tmp_path / "other"), "--host",
                 "fl.example.org"]) == 0
    with pytest.raises(ssl.SSLCertVerificationError, match="issuer"):
        _handshake(kit / "certs", "fl.example.org", tmp_path / "other" / "ca.pem")


def test_site_keys_are_what_flower_loads(kit: Path, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    code, out, _ = run(["keys", "new", "--site", "site-9", "--out", str(tmp_path)], capsys)
    assert code == 0
    private_path, public_path = tmp_path / "site-9.key", tmp_path / "site-9.pub"
    assert mode(private_path) == 0o600 and mode(public_path) == 0o644
    # what flower-supernode --auth-supernode-private-key does with the file
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # what `flwr supernode register` does with the .pub
    assert try_load_public_key(public_path) == public_key_to_bytes(key.public_key())
    # nothing secret is printed: paths and the public fingerprint only
    body = "".join(private_path.read_text().splitlines()[1:-1])
    assert body[:40] not in out and "PRIVATE" not in out and "SHA256:" in out


def test_credentials_are_never_overwritten_silently(kit: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = (kit / "keys" / "site-1.key").read_bytes()
    code, _, err = run(["keys", "new", "--site", "site-1", "--out", str(kit / "keys")], capsys)
    assert code == 2 and "already exists" in one_line_error(err)
    assert (kit / "keys" / "site-1.key").read_bytes() == before
    code, _, err = run(["certs", "init", "--out", str(kit / "certs"), "--host", "x.org"],
                       capsys)
    assert code == 2 and "already exists" in one_line_error(err)


@pytest.mark.parametrize(("argv", "needle"), [
    (["certs", "init", "--out", "{tmp}/c"], "at least one --host"),
    (["certs", "init", "--out", "{tmp}/c", "--host", "not a host!"], "not a host name"),
    (["keys", "new", "--site", "../evil", "--out", "{tmp}/k"], "--site '../evil'"),
])
def test_credential_usage_errors(argv: list[str], needle: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "c").exists() and not (tmp_path / "k").exists()


# --------------------------------------------------------------------------- refusals


def client_argv(kit: Path, **change: str | None) -> list[str]:
    args: dict[str, str | None] = {
        "--data": str(kit / "fed" / "site-1"), "--server": "127.0.0.1:9",
        "--ca": str(kit / "certs" / "ca.pem"), "--key": str(kit / "keys" / "site-1.key"),
        "--ledger-dir": str(kit / "ledger"), "--wait-server": "1"}
    args.update(change)
    argv = ["client"]
    for flag, value in args.items():
        if value is not None:
            argv += [flag] if value == "" else [flag, value]
    return argv


def test_client_refuses_bad_inputs_before_starting(kit: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes((kit / "keys" / "site-1.key").read_bytes())
    loose.chmod(0o644)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "site.toml").write_text("name = 'b'\n")
    bad_apps = tmp_path / "bad-apps.toml"
    bad_apps.write_text('epsilon = 4.0\n[apps]\napproved = ["not-a-hash"]\n')
    cases = [
        (client_argv(kit, **{"--server": "127.0.0.1"}), 2, "expected HOST:PORT"),
        (client_argv(kit, **{"--server": "::1:9092"}), 2, "IPv6 addresses in brackets"),
        (client_argv(kit, **{"--server": "host:99999"}), 2, "expected HOST:PORT"),
        (client_argv(kit, **{"--data": str(broken)}), 1, "not starting"),
        (client_argv(kit, **{"--site": "site-7"}), 2, "names the site 'site-1'"),
        (client_argv(kit, **{"--key": str(loose)}), 1, "chmod 600"),
        (client_argv(kit, **{"--key": str(tmp_path / "none.key")}), 1, "not found"),
        (client_argv(kit, **{"--key": str(kit / "certs" / "server.key")}), 1,
         "not an unencrypted OpenSSH private key"),
        (client_argv(kit, **{"--ca": str(kit / "keys" / "site-1.pub")}), 1, "not a PEM"),
        (client_argv(kit, **{"--ca": None}), 2, "--ca"),
        (client_argv(kit, **{"--insecure": ""}), 2, "drop --ca and --key"),
        (client_argv(kit, **{"--policy": str(tmp_path / "nope.toml")}), 1, "not found"),
        (client_argv(kit, **{"--policy": str(bad_apps)}), 1, "is not an app hash"),
    ]
    for argv, exit_code, needle in cases:
        code, _, err = run(argv, capsys)
        assert code == exit_code, (argv, err)
        assert needle in one_line_error(err), (argv, err)
    # an unreachable server is an error only after --wait-server seconds (after a notice)
    code, _, err = run(client_argv(kit), capsys)
    assert code == 1 and "not reachable yet" in err
    assert err.splitlines()[-1].startswith("mmfed: error: cannot reach the server at "
                                           "127.0.0.1:9 (Connection refused) after 1 s")


def server_argv(kit: Path, tmp_path: Path, **change: str | None) -> list[str]:
    args: dict[str, str | None] = {
        "--data": str(kit / "fed"), "--certs": str(kit / "certs"),
        "--admit": str(kit / "keys"), "--host": "127.0.0.1", "--port": str(free_port()),
        "--out": str(tmp_path / "run"),
        "--set": "privacy.min_cohort=2"}  # two sites: each accepts a sum of two
    args.update(change)
    argv = ["server"]
    for flag, value in args.items():
        if value is not None:
            argv += [flag] if value == "" else [flag, value]
    return argv


def test_server_refuses_bad_inputs_before_starting(kit: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    no_holdout = tmp_path / "fed-no-holdout"
    no_holdout.mkdir()
    loose = tmp_path / "loose-certs"
    loose.mkdir()
    for name in ("ca.pem", "server.pem", "server.key"):
        (loose / name).write_bytes((kit / "certs" / name).read_bytes())
    (loose / "server.key").chmod(0o640)
    busy = socket.create_server(("127.0.0.1", 0))
    port = str(busy.getsockname()[1])
    cases = [
        (server_argv(kit, tmp_path, **{"--port": port}), 1, "already in use"),
        (server_argv(kit, tmp_path, **{"--port": "70000"}), 2, "--port 70000"),
        (server_argv(kit, tmp_path, **{"--certs": None}), 2, "--certs DIR"),
        (server_argv(kit, tmp_path, **{"--admit": None}), 2, "--admit"),
        (server_argv(kit, tmp_path, **{"--certs": str(tmp_path / "nope")}), 1,
         "certificate folder not found"),
        (server_argv(kit, tmp_path, **{"--certs": str(loose)}), 1, "chmod 600"),
        (server_argv(kit, tmp_path, **{"--admit": str(kit / "keys" / "site-1.key")}), 1,
         "not an OpenSSH public key"),
        (server_argv(kit, tmp_path, **{"--data": str(no_holdout)}), 1, "no holdout/"),
        (server_argv(kit, tmp_path, **{"--data": None}), 2, "--data DIR"),
        (server_argv(kit, tmp_path, **{"--host": "10.9.9.9"}), 2, "not in"),
        (server_argv(kit, tmp_path, **{"--insecure": ""}), 2, "--admit needs TLS"),
        (server_argv(kit, tmp_path, **{"--sites": "5"}), 2, "only 2 site key(s)"),
        (server_argv(kit, tmp_path, **{"--set": None}), 2,
         "the server's request needs at least 3 sites in every secure sum"),
    ]
    try:
        for argv, exit_code, needle in cases:
            code, _, err = run(argv, capsys)
            assert code == exit_code, (argv, err)
            assert needle in one_line_error(err), (argv, err)
    finally:
        busy.close()
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_real_process_prints_one_line(kit: Path) -> None:
    bad = kit / "fed" / "site-2"
    proc = subprocess.run([*MMFED, "client", "--data", str(bad), "--server", "nohost",
                           "--ca", str(kit / "certs" / "ca.pem"), "--key",
                           str(kit / "keys" / "site-2.key")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **QUIET})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mmfed: error: --server 'nohost': expected HOST:PORT, e.g. "
                                   "10.0.0.5:9092 or [::1]:9092")


def test_a_flower_error_panel_is_reported_as_its_message() -> None:
    """`flwr run` prints errors as rich panels; the reason shown must be the panel's text,
    not its top border."""
    from mmfed.deploy.processes import last_meaningful

    tail = ["Loading project configuration...",
            "\x1b[31m╭─ Error ──────────────────────────────╮\x1b[0m",
            "│ Connection to the SuperLink was lost. │",
            "│ Is it running?                         │",
            "╰───────────────────────────────────────╯"]
    assert last_meaningful(tail) == "Error: Connection to the SuperLink was lost. Is it running?"
    assert last_meaningful(tail[:3]) == "Error: Connection to the SuperLink was lost."
    assert last_meaningful(["a", "ERROR: b", "c"]) == "ERROR: b"
    assert last_meaningful(["plain │ text"]) == "plain │ text"


def test_a_dead_critical_child_is_blamed_even_after_its_dependant_exits() -> None:
    """The server's failed-run path: a critical child that died (or dies a moment later) is
    the error, not the dependant's own complaint."""
    from mmfed.deploy.processes import ChildDied, Supervisor
    from mmfed.deploy.server import _blame_a_dead_child

    with Supervisor() as sup:
        link = sup.spawn("SuperLink", [sys.executable, "-c", "import time; time.sleep(60)"])
        _blame_a_dead_child(sup, 0.3)  # alive: nothing to blame
        threading.Timer(0.5, os.kill, (link.pid, 9)).start()
        with pytest.raises(ChildDied, match=rf"SuperLink \(pid {link.pid}\) exited "
                                            "unexpectedly with code -9"):
            _blame_a_dead_child(sup, 5.0)
