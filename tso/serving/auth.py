"""Who may call the REST API: the bearer token, where it comes from, and when one is required.

Fail closed: a token is required whenever ``serve.host`` is not loopback, an empty or whitespace
token is an error (never "auth off"), and the token is stripped wherever it is read, so a secret
mounted with a trailing newline still matches. Only the token's SHA-256 leaves the process that
reads it (the replicas compare digests); neither the token nor the Authorization header is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from tso.config import LOOPBACK_HOSTS, ConfigError, ServeConfig


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def resolve_token(serve: ServeConfig, source: str = "<config>") -> str | None:
    """The bearer token from ``serve.auth_token_file`` or the ``serve.auth_token_env`` variable (the
    file wins when both are set), or None when neither is set. Raises ConfigError naming the setting
    for an unreadable file, an empty token, or no token on a non-loopback host."""
    token = None
    if serve.auth_token_file:
        path = Path(os.path.expandvars(os.path.expanduser(serve.auth_token_file)))
        try:
            token = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(source, "serve.auth_token_file", f"cannot read the token file {path}: {e}") from None
        if not token.strip():
            raise ConfigError(source, "serve.auth_token_file", f"the token file {path} is empty")
    elif serve.auth_token_env in os.environ:
        token = os.environ[serve.auth_token_env]
        if not token.strip():
            raise ConfigError(source, "serve.auth_token_env",
                              f"${serve.auth_token_env} is set but empty: set a token, or unset it on a loopback host")
    token = token.strip() if token is not None else None
    if token is None and not serve.loopback:
        raise ConfigError(
            source, "serve.host",
            f"{serve.host} is not a loopback address, so the API needs a token: set ${serve.auth_token_env} "
            "or serve.auth_token_file (or bind serve.host: 127.0.0.1)")
    return token


def require_token_for(host: str, has_token: bool, source: str = "<config>") -> None:
    """The same rule for an address Serve already binds (a proxy started by someone else)."""
    if not has_token and host not in LOOPBACK_HOSTS:
        raise ConfigError(source, "serve.host",
                          f"Serve's HTTP proxy on this cluster binds {host}, not loopback: the API needs a token")


def token_matches(presented: str | None, digest: str) -> bool:
    return presented is not None and hmac.compare_digest(token_digest(presented), digest)


def allowed_hosts(serve: ServeConfig) -> list[str]:
    """Host headers the API answers (DNS-rebinding guard): loopback names, the bound host, and
    ``serve.allowed_hosts`` ("*" allows any)."""
    hosts = [*LOOPBACK_HOSTS, serve.host, *serve.allowed_hosts]
    return sorted({h.strip("[]").lower() for h in hosts if h and h not in ("0.0.0.0", "::")})


def host_of(header: str | None) -> str | None:
    """The host part of a Host header (``[::1]:8000`` -> ``::1``), lower case; None when malformed."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "x"
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end]
    host, sep, port = header.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host or None
    return header if ":" not in header else None
