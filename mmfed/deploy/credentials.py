"""Credentials for a deployment: a private CA, the SuperLink's TLS certificate, site keys.

Everything is made with ``cryptography`` so no operator ever needs ``openssl`` recipes,
and the files come out in exactly the formats Flower 1.41 reads: PEM certificates for
TLS, and OpenSSH-encoded NIST P-384 keys for SuperNode authentication
(``flower-supernode --auth-supernode-private-key`` / ``flwr supernode register``).

Private keys are created with mode 0600 from the first byte (``O_EXCL`` + mode, not
chmod afterwards), are never overwritten silently, and never appear in any output:
commands print paths and public fingerprints only.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mmfed.errors import ConfigError, UsageError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# The SuperLink's own helpers (SuperExec) reach it on loopback, so these names are in
# every server certificate whatever public names the operator asks for.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Create ``path`` with mode 0600 from the start; refuse to replace a key by accident."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to replace it)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes, *, force: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to replace it)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def check_private_file(path: Path, what: str) -> bytes:
    """Read a private key, refusing one that others can read (as ssh does)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: {what} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path}: {what} is readable by other users (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None


def load_certificates(path: Path, what: str = "CA certificate") -> list[x509.Certificate]:
    """PEM certificates in a file; a clear line for anything that is not one."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM {what}") from None
    return certs


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA256:base64, the form ``ssh-keygen -l`` prints, so operators can compare keys."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise UsageError(f"--host {host!r}: not a host name or IP address")
    return x509.DNSName(host.rstrip(".").lower())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mmfed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertsResult:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]


def init_certs(out: Path, hosts: list[str], *, days: int = 825, ca_days: int = 3650,
               force: bool = False) -> CertsResult:
    """A fresh CA and a SuperLink certificate valid for ``hosts`` plus loopback."""
    if not hosts:
        raise UsageError("give at least one --host: the name or address sites use to "
                         "reach the server")
    if not 1 <= days <= ca_days:
        raise UsageError(f"--days must be between 1 and the CA's lifetime ({ca_days})")
    names: list[str] = []
    for host in [*hosts, *LOOPBACK_NAMES]:
        if host not in names:
            names.append(host)
    sans = [_general_name(h) for h in names]
    paths = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists (use --force to replace the whole "
                         "set; every site then needs the new ca.pem)")

    now = _now() - datetime.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("mmfed federation CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    out.mkdir(parents=True, exist_ok=True)
    write_private(out / CA_KEY, ca_key.private_bytes(pem, pkcs8, plain), force=force)
    write_private(out / SERVER_KEY, server_key.private_bytes(pem, pkcs8, plain), force=force)
    write_public(out / CA_CERT, ca_cert.public_bytes(pem), force=force)
    write_public(out / SERVER_CERT, server_cert.public_bytes(pem), force=force)
    return CertsResult(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY,
                       tuple(names))


@dataclass(frozen=True)
class SiteKeys:
    site: str
    private: Path
    public: Path
    fingerprint: str


def check_site_name(site: str) -> str:
    if not SITE_NAME.match(site):
        raise UsageError(f"--site {site!r}: use letters, digits, '.', '_' or '-' (at most "
                         "64 characters, starting with a letter or digit)")
    return site


def new_site_keys(site: str, out: Path, *, force: bool = False) -> SiteKeys:
    """A SuperNode authentication key pair: OUT/SITE.key (0600) and OUT/SITE.pub."""
    check_site_name(site)
    private_path, public_path = out / f"{site}.key", out / f"{site}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} already exists (use --force to replace it; the server "
                             "must then admit the new .pub)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    write_private(private_path, private, force=force)
    write_public(public_path, public + f" mmfed-site:{site}\n".encode(), force=force)
    return SiteKeys(site, private_path, public_path, fingerprint(key.public_key()))


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's SuperNode key: mode 0600, OpenSSH, NIST EC (what flower-supernode reads)."""
    data = check_private_file(path, "site private key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key (make one with "
                          "`mmfed keys new`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: SuperNode keys must be NIST elliptic-curve keys (make "
                          "one with `mmfed keys new`)")
    return key


@dataclass(frozen=True)
class AdmittedSite:
    name: str
    path: Path
    fingerprint: str


def load_site_public_key(path: Path) -> AdmittedSite:
    """A ``.pub`` to admit; the site's name is the file name without ``.pub``."""
    data = _read(path, "site public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not an OpenSSH public key (use the .pub from "
                          "`mmfed keys new`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: SuperNode keys must be NIST elliptic-curve keys")
    name = path.name[:-4] if path.name.endswith(".pub") else path.stem
    return AdmittedSite(check_site_name(name), path.resolve(), fingerprint(key))


def collect_admitted(paths: list[Path]) -> list[AdmittedSite]:
    """``--admit`` takes .pub files and folders of them; each key may appear only once."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pub"))
            if not found:
                raise ConfigError(f"{path}: no .pub files to admit")
            files.extend(found)
        else:
            files.append(path)
    sites = [load_site_public_key(p) for p in files]
    seen: dict[str, AdmittedSite] = {}
    for site in sites:
        for other in seen.values():
            if other.fingerprint == site.fingerprint:
                raise ConfigError(f"{site.path} and {other.path} are the same key")
        if site.name in seen:
            raise ConfigError(f"two keys for site {site.name!r}: {seen[site.name].path} and "
                              f"{site.path}")
        seen[site.name] = site
    if not sites:
        raise UsageError("admit at least one site: --admit SITE.pub or --admit FOLDER")
    return sites


@dataclass(frozen=True)
class ServerCredentials:
    ca: Path
    cert: Path
    key: Path


def server_credentials(folder: Path) -> ServerCredentials:
    """Check the certificate set from ``mmfed certs init`` before the SuperLink sees it."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: certificate folder not found (create it with "
                          "`mmfed certs init`)")
    ca_path, cert_path, key_path = folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY
    ca = load_certificates(ca_path)[0]
    cert = load_certificates(cert_path, "server certificate")[0]
    key_data = check_private_file(key_path, "server private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{key_path} does not belong to {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise ConfigError(f"{cert_path} was not issued by {ca_path}") from None
    if "127.0.0.1" not in certificate_names(cert_path):
        raise ConfigError(f"{cert_path} is not valid for 127.0.0.1, where Flower's own "
                          "helpers reach the SuperLink; make it with `mmfed certs init`")
    now = _now()
    if cert.not_valid_after_utc < now:
        raise ConfigError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                          "run `mmfed certs init --force` again")
    if ca.not_valid_after_utc < now:
        raise ConfigError(f"{ca_path} expired on {ca.not_valid_after_utc:%Y-%m-%d}")
    return ServerCredentials(ca_path.resolve(), cert_path.resolve(), key_path.resolve())


def certificate_names(path: Path) -> list[str]:
    """The DNS names and addresses a server certificate is valid for."""
    cert = load_certificates(path, "server certificate")[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
