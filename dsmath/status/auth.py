"""Who may read a run's status: loopback checks, the run's bearer token, and TLS addresses.

Guaranteed: :func:`server_token` never returns None for a non-loopback host (it refuses instead), and a generated
token file is created with mode 0600 (owner read/write only) before the token is written into it.
Not guaranteed: secrecy of a token passed on a command line (argv is public); prefer ``$DSMATH_STATUS_TOKEN``.
Importing this module loads neither gRPC nor Ray.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from dsmath.errors import ConfigError

TOKEN_ENV = "DSMATH_STATUS_TOKEN"
TOKEN_FILE = "status_token"
TLS_SCHEME = "grpcs://"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); False for wildcards and every other name."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_token_file(run_dir: str | Path) -> tuple[str, Path]:
    """A fresh ``secrets.token_urlsafe(32)`` written to ``RUN_DIR/status_token`` (mode 0600); (token, path)."""
    path = Path(run_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        path.unlink()  # an old run's file may have looser permissions: start from a new inode
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, path


def server_token(mode: str, host: str, run_dir: str | Path) -> tuple[str | None, Path | None]:
    """The token a run's status server checks, and the file it was written to (generated tokens only).

    ``mode`` is ``status.token``: ``auto`` ($DSMATH_STATUS_TOKEN, else none on loopback, else generated),
    ``generate``, ``env`` (the variable must be set), ``none`` (refused off loopback).
    """
    from_env = os.environ.get(TOKEN_ENV) or None
    if mode == "env":
        if not from_env:
            raise ConfigError(f"status.token=env but ${TOKEN_ENV} is not set in the job's environment")
        return from_env, None
    if mode == "none":
        if not is_loopback(host):
            raise ConfigError(f"status.token=none with status.host={host}: refused (use status.token=auto)")
        return None, None
    if mode == "auto" and from_env:
        return from_env, None
    if mode == "auto" and is_loopback(host):
        return None, None
    return write_token_file(run_dir)


def read_run_token(run_dir: str | Path) -> str | None:
    """The generated token in ``RUN_DIR/status_token`` when this user can read it, else None."""
    try:
        return (Path(run_dir) / TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return None


def split_address(address: str) -> tuple[str, bool]:
    """``"grpcs://host:port"`` -> (``"host:port"``, TLS on); ``"host:port"`` -> (itself, TLS off)."""
    if address.startswith(TLS_SCHEME):
        return address[len(TLS_SCHEME):], True
    if address.startswith("grpc://"):
        return address[len("grpc://"):], False
    return address, False
