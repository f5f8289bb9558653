"""Datasource passwords encrypted at rest, with keys the operator supplies.

Keys are Fernet keys (``SecretBox.generate_key()``, or ``python -c "from
cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``),
taken from ``CONVCORE_SECRET_KEYS`` (comma-separated) and/or the file named by
``CONVCORE_SECRET_KEY_FILE`` (one key a line, ``#`` comments). The first key
encrypts; every key decrypts (cryptography's ``MultiFernet``), which is what
rotation needs:

1. put a new key first, keeping the old ones after it, and restart: at start
   the service re-encrypts every stored password under the first key;
2. then drop the old keys.

Without a key the service stores no password at all: a datasource that
needs one is refused (it would otherwise sit in the store in plain text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from convcore.errors import InvalidRequestError, MissingDependencyError, StorageError

__all__ = ["KEYS_ENV", "KEY_FILE_ENV", "SecretBox"]

KEYS_ENV = "CONVCORE_SECRET_KEYS"
KEY_FILE_ENV = "CONVCORE_SECRET_KEY_FILE"


def _fernet() -> tuple[type, type, type[Exception]]:
    try:
        from cryptography.fernet import Fernet, InvalidToken, MultiFernet
    except ImportError as exc:  # pragma: no cover - the scenes extra installs it
        raise MissingDependencyError("encrypting datasource passwords", "scenes") from exc
    return Fernet, MultiFernet, InvalidToken


class SecretBox:
    """Seals and opens short secrets with a list of Fernet keys (first one encrypts)."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        fernet, multi, self._invalid = _fernet()
        if not keys:
            raise InvalidRequestError("no secret key given", field="secret_keys")
        made = []
        for i, key in enumerate(keys, start=1):
            try:
                made.append(fernet(key.encode("ascii") if isinstance(key, str) else key))
            except (ValueError, TypeError, UnicodeEncodeError):
                # Never the key itself in the message.
                raise InvalidRequestError(
                    f"secret key {i} is not a Fernet key (32 url-safe base64-encoded bytes)",
                    field="secret_keys",
                ) from None
        self._multi = multi(made)

    @staticmethod
    def generate_key() -> str:
        fernet, _, _ = _fernet()
        key: bytes = fernet.generate_key()  # type: ignore[attr-defined]
        return key.decode("ascii")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SecretBox | None:
        """The box for ``$CONVCORE_SECRET_KEYS`` then ``$CONVCORE_SECRET_KEY_FILE``'s
        keys, in that order; None if neither names a key."""
        keys = [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
        path = environ.get(KEY_FILE_ENV, "").strip()
        if path:
            try:
                text = Path(path).expanduser().read_text("utf-8")
            except OSError as exc:
                raise InvalidRequestError(
                    f"cannot read the secret key file: {exc.strerror}", field=KEY_FILE_ENV
                ) from None
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return cls(keys) if keys else None

    def seal(self, secret: str) -> str:
        token: bytes = self._multi.encrypt(secret.encode("utf-8"))
        return token.decode("ascii")

    def open(self, token: str) -> str:
        """The secret; StorageError if no key here can open it (the key was dropped)."""
        try:
            plain: bytes = self._multi.decrypt(token.encode("ascii"))
        except (self._invalid, UnicodeEncodeError):
            raise StorageError(
                "a stored password cannot be decrypted with the configured secret keys"
            ) from None
        return plain.decode("utf-8")

    def rotate(self, token: str) -> str:
        """``token`` sealed again under the first key."""
        try:
            fresh: bytes = self._multi.rotate(token.encode("ascii"))
        except (self._invalid, UnicodeEncodeError):
            raise StorageError(
                "a stored password cannot be decrypted with the configured secret keys"
            ) from None
        return fresh.decode("ascii")
