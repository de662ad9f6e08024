"""Provider credentials at rest: envelope encryption, so that Redis never holds one in clear.

A runtime model's credential (its ``api_key``, an AWS secret...) is encrypted with a data
key of its own (AES-256-GCM), and that data key with the key-encryption key, derived
from ``LITELLM_SALT_KEY`` (LiteLLM's setting for the same purpose), else from the master
key, as LiteLLM does. Both encryptions bind the model's id and the field's name: a sealed
value copied onto another model or field does not open. A value that does not open (the
salt key changed, or the stored text was altered) is an error, never a credential.

    sealed:v1:<key id>:<base64 nonce + wrapped data key>:<base64 nonce + ciphertext>
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "sealed:v1:"
SALT_KEY_ENV = "LITELLM_SALT_KEY"
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed value that does not open with this key, or a value that is not sealed."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """Seals and opens credentials with one key-encryption key."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("no key to seal credentials with")
        derived = _derive(secret)
        self._kek = AESGCM(derived[:32])
        # Which key sealed a value: a wrong key is told apart from an altered value.
        self.key_id = hashlib.sha256(derived[32:]).hexdigest()[:8]

    @classmethod
    def from_environment(cls, master_key: str | None, environ: dict[str, str] | None = None) -> "Sealer | None":
        environ = dict(os.environ) if environ is None else environ
        secret = environ.get(SALT_KEY_ENV) or master_key
        return cls(secret) if secret else None

    def seal(self, value: str, context: str) -> str:
        data_key = AESGCM.generate_key(bit_length=256)
        n1, n2 = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
        aad = context.encode()
        body = AESGCM(data_key).encrypt(n1, value.encode(), aad)
        wrapped = self._kek.encrypt(n2, data_key, aad)
        return f"{PREFIX}{self.key_id}:{_b64(n2 + wrapped)}:{_b64(n1 + body)}"

    def open(self, sealed: str, context: str) -> str:
        if not sealed.startswith(PREFIX):
            raise SealError("not a sealed value")
        try:
            key_id, wrapped, body = sealed[len(PREFIX):].split(":")
        except ValueError:
            raise SealError("a sealed value of the wrong shape") from None
        if key_id != self.key_id:
            raise SealError(f"sealed with another key (key id {key_id}, this one {self.key_id}): "
                            f"{SALT_KEY_ENV} or the master key changed")
        aad = context.encode()
        try:
            w, b = _unb64(wrapped), _unb64(body)
            data_key = self._kek.decrypt(w[:NONCE_BYTES], w[NONCE_BYTES:], aad)
            return AESGCM(data_key).decrypt(b[:NONCE_BYTES], b[NONCE_BYTES:], aad).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise SealError("a sealed value that does not open: altered, or moved from another model") from None


@functools.lru_cache(maxsize=4)
def _derive(secret: str) -> bytes:
    """The key-encryption key and the key id's material, from the secret by scrypt: what
    Redis holds does not let a weak master key be guessed at a hash's speed."""
    return hashlib.scrypt(secret.encode(), salt=b"extauthz credentials v1", n=2**14, r=8, p=1, dklen=64)


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)
