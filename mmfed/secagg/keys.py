"""Key agreement, key derivation and share encryption for secure aggregation.

Each site holds two X25519 key pairs per round: ``c`` keys encrypt the Shamir shares it
sends to its neighbours through the server, ``s`` keys derive its pairwise masks. They
are kept separate so that revealing a dropped site's ``s`` secret key (to remove its
masks) never exposes the channel its shares travelled on.

Every derived key is bound, through the HKDF ``info`` string, to the run id, the round
and the unordered pair of site ids: even if a key pair were reused, masks and share keys
would differ in every round and every run. AES-GCM additionally authenticates the run,
round, sender and receiver of each share as associated data, so the server (which only
relays ciphertext) cannot redirect, swap or replay a share without decryption failing.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mmfed.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"mmfed-secagg/v1"
_PURPOSES = ("pair-mask", "share-key")


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key and its raw 32-byte public key."""
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    """Raw private key, the form in which a mask key is Shamir-shared."""
    return sk.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key must be {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def check_public(pk: object, what: str = "public key") -> bytes:
    """Reject anything that is not 32 raw bytes before it reaches X25519."""
    if not isinstance(pk, bytes | bytearray) or len(pk) != KEY_BYTES:
        raise SecAggError(f"{what} must be {KEY_BYTES} raw bytes")
    return bytes(pk)


def _encode_context(run_id: str, round_: int, *site_ids: int) -> bytes:
    """Unambiguous byte encoding of (run id, round, site ids) for HKDF info and GCM AAD."""
    rid = run_id.encode("utf-8")
    if not 0 <= round_ < 2**64 or any(not 0 <= s < 2**64 for s in site_ids):
        raise SecAggError("round and site ids must be integers in 0..2**64-1")
    out = len(rid).to_bytes(4, "big") + rid + round_.to_bytes(8, "big")
    return out + b"".join(s.to_bytes(8, "big") for s in site_ids)


def derive_key(
    my_sk: X25519PrivateKey,
    peer_pk: bytes,
    purpose: str,
    run_id: str,
    round_: int,
    me: int,
    peer: int,
) -> bytes:
    """32-byte key shared by ``me`` and ``peer`` for one purpose in one round of one run.

    The pair is put in ascending order so both ends derive the same key.
    """
    if purpose not in _PURPOSES:
        raise SecAggError(f"unknown key purpose {purpose!r}; expected one of {_PURPOSES}")
    if me == peer:
        raise SecAggError(f"site {me} cannot derive a pairwise key with itself")
    try:
        peer_key = X25519PublicKey.from_public_bytes(check_public(peer_pk))
        shared = my_sk.exchange(peer_key)
    except ValueError as err:  # e.g. a low-order point gives an all-zero secret
        raise SecAggError(f"unusable public key from site {peer}: {err}") from err
    lo, hi = sorted((me, peer))
    info = _DOMAIN + b"\x00" + purpose.encode() + b"\x00" + _encode_context(run_id, round_, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _aad(run_id: str, round_: int, sender: int, receiver: int) -> bytes:
    return _DOMAIN + b"\x00share\x00" + _encode_context(run_id, round_, sender, receiver)


def encrypt_share(
    key: bytes, plaintext: bytes, run_id: str, round_: int, sender: int, receiver: int
) -> bytes:
    """nonce || AES-256-GCM(plaintext), authenticated for this run, round and direction."""
    nonce = os.urandom(NONCE_BYTES)
    aad = _aad(run_id, round_, sender, receiver)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_share(
    key: bytes, ciphertext: bytes, run_id: str, round_: int, sender: int, receiver: int
) -> bytes:
    """Plaintext of :func:`encrypt_share`; any tampering or misrouting is a SecAggError."""
    if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"share ciphertext from site {sender} is truncated")
    data = bytes(ciphertext)
    try:
        return AESGCM(key).decrypt(
            data[:NONCE_BYTES], data[NONCE_BYTES:], _aad(run_id, round_, sender, receiver)
        )
    except InvalidTag as err:
        raise SecAggError(
            f"share ciphertext from site {sender} to site {receiver} failed authentication "
            "(tampered, replayed or misrouted)"
        ) from err
