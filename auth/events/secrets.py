"""Event endpoints' signing secrets: generated here, shown once, stored encrypted.

A signing secret must be usable to sign again at every delivery, so unlike an API key it cannot
be kept as a one-way digest. It is encrypted with Fernet (``cryptography``: AES-128-CBC and
HMAC-SHA256) under a key derived by HKDF from ``MODELGATE_KEY_PEPPER``: a copy of the database
alone does not reveal it, and no hand-made cryptography is involved."""

from __future__ import annotations

import base64
import secrets

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_PREFIX = "whsec_"  # noqa: S105 (the form's prefix, not a secret)
# Standard Webhooks recommend 24 to 64 bytes of key.
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh signing secret in the ``whsec_<base64>`` form Standard Webhooks use."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class SecretBox:
    """Encrypts and decrypts signing secrets with a key derived from the pepper."""

    def __init__(self, pepper: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"modelgate event endpoint signing secrets v1",
        ).derive(pepper)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, secret: str) -> str:
        """The stored form of ``secret``."""
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, ciphertext: str) -> str:
        """The secret back; ``ValueError`` if it was sealed under another pepper."""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise ValueError("this secret was sealed under another key pepper") from None
