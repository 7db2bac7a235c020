"""Who may open calls and mint client secrets: the server's API key and ``ek_`` secrets.

Policy layer (config) plus pure checks; no HTTP framework here (app.py maps ``AuthError`` to a
401 JSON body). Two modes:

- ``required`` (the default): ``POST /v1/realtime/client_secrets`` needs
  ``Authorization: Bearer <TRANSCEIVER_API_KEY>``; ``POST /v1/realtime/calls`` needs that key or
  an unexpired ``ek_`` secret. Starting in this mode without an API key fails with a clear
  message: the server is never silently open.
- ``off``: local development only, chosen explicitly with ``TRANSCEIVER_AUTH=off`` or
  ``--insecure-dev``; anyone may call (a valid ``ek_`` still carries its session config; an
  invalid one is ignored, not refused). The process prints a loud warning.

``ek_`` secrets are signed with their own keyring, ``TRANSCEIVER_SECRET_KEYS`` (``ID:HEX[,ID:HEX]``
as for ufrags: the first signs, every key verifies, so keys rotate), shared by the transceivers
and by nobody else. It is not the ufrag keyring (``TRANSCEIVER_KEYS``) because every relay holds
that one: a compromised relay could otherwise mint secrets. Required when auth is on; with auth
off and no keyring set, each process signs with a random key of its own (a secret then opens
calls with its session config only on the transceiver that minted it).

A secret whose session is too large to carry (``client_secrets``: ``too_large``) is minted
naming it in the session store instead (``SecretSessionStore``: with Redis,
``transceiver.store.secret_sessions``), and opening a call with it loads the session back: a
session no longer stored is refused as an expired secret is (401 ``client_secret_expired``),
an unreachable store is 503 ``session_store_unavailable``. Without a store such a session is
refused (400 ``too_large``) with the reason and what to do.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from relay.wire.ufrag import GENERATE_HINT, MIN_SECRET_BYTES, Keyring
from transceiver.http import client_secrets
from transceiver.http.client_secrets import ClientSecret, ClientSecretError
from transceiver.store.errors import StoreError

ENV_MODE = "TRANSCEIVER_AUTH"
ENV_API_KEY = "TRANSCEIVER_API_KEY"
ENV_SECRET_KEYS = "TRANSCEIVER_SECRET_KEYS"
MODES = ("required", "off")
MIN_API_KEY_CHARS = 16
WARNING_LINES = (
    "transceiver: AUTHENTICATION IS OFF (TRANSCEIVER_AUTH=off / --insecure-dev).",
    "Anyone who can reach the HTTP port can open calls and mint client secrets.",
    "Local development only: set TRANSCEIVER_API_KEY, TRANSCEIVER_AUTH=required.",
)
NO_STORE_ADVICE = (
    "A larger session is kept in the session store, which this deployment does not have "
    "(set REDIS_URL on the transceivers); or mint the secret with a shorter session and send "
    "the rest with session.update once connected"
)
WARNING = "\n".join(["!" * 82, *(f"!! {line:<76} !!" for line in WARNING_LINES), "!" * 82])


class AuthConfigError(ValueError):
    """An auth setting that does not validate; the message names the variable."""


class AuthError(Exception):
    """A request that is not authorised; ``code`` is a stable machine-readable reason and
    ``status`` the HTTP status it answers (401; 503 when the session store cannot be read)."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class SecretSessionStore(Protocol):
    """Where the sessions of secrets too large to carry them are kept (StoreError)."""

    async def put(self, session: Mapping[str, Any], ttl_s: int) -> str: ...

    async def load(self, reference: str) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class AuthConfig:
    mode: str
    api_key: str | None
    secret_keys: Keyring | None = None  # signs ek_ secrets; None only with auth off

    @property
    def required(self) -> bool:
        return self.mode == "required"

    @classmethod
    def from_flags(cls, flags: argparse.Namespace, environ: Mapping[str, str]) -> AuthConfig:
        """Auth settings from ``TRANSCEIVER_AUTH``/``TRANSCEIVER_API_KEY``/
        ``TRANSCEIVER_SECRET_KEYS`` and the ``auth_flags()`` (a flag wins). The keys are read
        from the environment only: a flag would show them in ``ps``."""
        mode = "off" if flags.insecure_dev else flags.auth or environ.get(ENV_MODE, "required")
        mode = mode.strip().lower()
        return cls.validated(mode, environ.get(ENV_API_KEY), environ.get(ENV_SECRET_KEYS))

    @classmethod
    def validated(
        cls, mode: str, api_key: str | None, secret_keys: str | None = None
    ) -> AuthConfig:
        if mode not in MODES:
            raise AuthConfigError(f"{ENV_MODE}={mode!r} is not one of {', '.join(MODES)}")
        key = (api_key or "").strip() or None
        if key is not None:
            _check_api_key(key)
        elif mode == "required":
            raise AuthConfigError(
                f"{ENV_MODE}=required (the default) but {ENV_API_KEY} is not set: set an API "
                f"key, or for local development only run with --insecure-dev ({ENV_MODE}=off)"
            )
        return cls(mode, key, _secret_keyring(mode, secret_keys))

    def check_apart_from(self, ufrag_keyring: Keyring) -> None:
        """Refuse a secret keyring that shares a secret with the ufrag keyring (relays hold it)."""
        shared = set(ufrag_keyring.secrets.values())
        if self.secret_keys is not None and shared & set(self.secret_keys.secrets.values()):
            raise AuthConfigError(
                f"{ENV_SECRET_KEYS} reuses a secret of TRANSCEIVER_KEYS, which every relay "
                "holds: give ek_ client secrets a keyring of their own"
            )

    def warn_if_open(self, stream: TextIO = sys.stderr) -> None:
        if not self.required:
            print(WARNING, file=stream, flush=True)


def _secret_keyring(mode: str, spec: str | None) -> Keyring | None:
    if spec is None or not spec.strip():
        if mode == "required":
            raise AuthConfigError(
                f"{ENV_MODE}=required (the default) but {ENV_SECRET_KEYS} is not set: ek_ "
                f"client secrets are signed with a keyring of their own, ID:HEX[,ID:HEX], "
                f"shared by the transceivers only; {GENERATE_HINT}"
            )
        return None
    try:
        return Keyring.parse(spec)
    except ValueError as exc:
        raise AuthConfigError(f"{ENV_SECRET_KEYS}: {exc}") from None


def auth_flags() -> argparse.ArgumentParser:
    """The auth flags, also shown by the transceiver's ``--help`` (as a parent parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--auth",
        choices=MODES,
        help=f"who may call: required (an API key or ek_ secret) or off [{ENV_MODE}, "
        f"default required; the keys come from {ENV_API_KEY} and {ENV_SECRET_KEYS} only]",
    )
    parser.add_argument(
        "--insecure-dev",
        action="store_true",
        help="local development only: authentication off (same as --auth off)",
    )
    return parser


def _check_api_key(key: str) -> None:
    if len(key) < MIN_API_KEY_CHARS:
        raise AuthConfigError(f"{ENV_API_KEY} is shorter than {MIN_API_KEY_CHARS} characters")
    if key.startswith(client_secrets.PREFIX):
        raise AuthConfigError(f"{ENV_API_KEY} must not start with {client_secrets.PREFIX!r}")
    if any(c.isspace() for c in key):
        raise AuthConfigError(f"{ENV_API_KEY} must not contain whitespace")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent."""
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("invalid_authorization", "Authorization must be 'Bearer <key>'")
    return token.strip()


class Authenticator:
    """Checks API keys and ``ek_`` secrets; mints secrets. ``clock`` gives unix seconds."""

    def __init__(
        self,
        config: AuthConfig,
        clock: Callable[[], float] = time.time,
        secret_sessions: SecretSessionStore | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._secret_sessions = secret_sessions
        keyring = config.secret_keys or Keyring(0, {0: os.urandom(MIN_SECRET_BYTES)})
        self._signing_key = client_secrets.signing_key(keyring.secrets[keyring.current_id])
        self._verify_keys = [client_secrets.signing_key(s) for s in keyring.secrets.values()]

    def check_api_key(self, authorization: str | None) -> None:
        """For minting client secrets: the API key (auth on), anything (auth off)."""
        token = bearer_token(authorization)
        if not self.config.required:
            return
        if token is None:
            raise _missing()
        if not self._is_api_key(token):
            raise AuthError("invalid_api_key", "the API key is not valid for this server")

    async def check_call(self, authorization: str | None) -> Mapping[str, Any] | None:
        """For opening a call: the session config of an ``ek_`` secret (carried or stored)."""
        token = bearer_token(authorization) if self.config.required else _lenient(authorization)
        if token is not None and token.startswith(client_secrets.PREFIX):
            return await self._secret_session(token)
        if not self.config.required:
            return None
        if token is None:
            raise _missing()
        if not self._is_api_key(token):
            raise AuthError("invalid_api_key", "neither the API key nor an ek_ client secret")
        return None

    async def _secret_session(self, token: str) -> Mapping[str, Any] | None:
        try:
            return await self.secret_session(self.verify_secret(token))
        except AuthError as exc:
            if self.config.required or exc.status != 401:
                raise
            return None  # auth off: a stale or foreign secret opens the call with defaults

    async def secret_session(self, secret: ClientSecret) -> Mapping[str, Any] | None:
        """The session a verified secret grants: its own, or the one it names in the store."""
        if secret.reference is None:
            return secret.session
        if self._secret_sessions is None:
            raise AuthError(
                "client_secret_expired",
                "the client secret names a session kept in the session store, and this "
                "transceiver has none: give it the REDIS_URL of the transceiver that minted it",
            )
        session = await self._stored_session(self._secret_sessions, secret.reference)
        if session is None:
            raise AuthError(
                "client_secret_expired",
                "the client secret's session is no longer stored (the secret expired, or the "
                "session store lost it): mint a new client secret",
            )
        return session

    async def _stored_session(
        self, store: SecretSessionStore, reference: str
    ) -> Mapping[str, Any] | None:
        try:
            return await store.load(reference)
        except StoreError as exc:
            raise _store_unavailable(exc) from None
        except ValueError as exc:  # not written by us
            raise AuthError("client_secret_format", f"unreadable stored session: {exc}") from None

    def verify_secret(self, value: str) -> ClientSecret:
        now_s = self._clock()
        last: ClientSecretError | None = None
        for key in self._verify_keys:
            try:
                return client_secrets.verify(key, value, now_s)
            except ClientSecretError as exc:
                last = exc
                if exc.reason != "signature":
                    break
        assert last is not None
        raise AuthError(f"client_secret_{last.reason}", str(last)) from None

    async def mint(self, ttl_s: int, session: Mapping[str, Any] | None) -> ClientSecret:
        """A secret carrying ``session``, else naming it in the session store (too large to
        carry); ClientSecretError (400), AuthError 503 (the store is unreachable)."""
        try:
            return client_secrets.mint(self._signing_key, self._clock(), ttl_s, session)
        except ClientSecretError as exc:
            if exc.reason != "too_large" or session is None:
                raise
            if self._secret_sessions is None:
                raise ClientSecretError("too_large", f"{exc}. {NO_STORE_ADVICE}") from None
        return await self._mint_stored(self._secret_sessions, ttl_s, session)

    async def _mint_stored(
        self, store: SecretSessionStore, ttl_s: int, session: Mapping[str, Any]
    ) -> ClientSecret:
        try:
            reference = await store.put(session, ttl_s)
        except StoreError as exc:
            raise _store_unavailable(exc) from None
        except ValueError as exc:
            raise ClientSecretError("too_large", str(exc)) from None
        now_s = self._clock()
        return client_secrets.mint_reference(self._signing_key, now_s, ttl_s, reference, session)

    def _is_api_key(self, token: str) -> bool:
        key = self.config.api_key
        return key is not None and hmac.compare_digest(token.encode(), key.encode())


def _lenient(authorization: str | None) -> str | None:
    try:
        return bearer_token(authorization)
    except AuthError:
        return None


def _store_unavailable(exc: StoreError) -> AuthError:
    message = f"the session store keeping large client secret sessions is unavailable: {exc}"
    return AuthError("session_store_unavailable", message, 503)


def _missing() -> AuthError:
    return AuthError(
        "missing_authorization",
        "send 'Authorization: Bearer <API key or ek_ client secret>'",
    )
