"""API bearer tokens: the store (hashes only) and the access policy around it.

A token is ``sgw_`` followed by 43 URL-safe characters (32 random bytes). Only
its SHA-256 is kept, with a name and the time it was created, in the JSON
file named by ``api.tokens_file``::

    {"version": 1, "tokens": [{"name": "alice", "sha256": "…", "created": "…Z"}]}

A plain (unsalted) hash is enough because tokens are long random strings
(ours carry 256 bits; one given with ``--stdin`` must have 32 characters or
more): nobody can search for a preimage. The file is rewritten atomically (a
temporary file renamed over it), keeping the owner, group and mode it had
(never more than 0640; a new file is 0600), so a deployment can make it
readable by the service's group alone. The API stats it on every request and
reads it again when it changed: ``sensor-gateway token revoke NAME`` takes
effect at the next request, without a restart.

``api.tokens_file`` is relative to the configuration file's folder. Unlike the
``*_file`` secrets it is never looked up in ``$CREDENTIALS_DIRECTORY``: systemd
copies credentials once, at start, and a revoked token would live on there.

The access policy (:func:`enforced`, :func:`check_startup`): the API requires a
token on every route but ``/healthz`` when it is bound beyond loopback or as
soon as the token file exists (the first ``token add`` creates it; revoking
every token leaves it, so the API stays closed; deleting it reopens a
loopback-only API), unless ``api.allow_anonymous = true``. Bound beyond
loopback with no token and without ``allow_anonymous`` it refuses to start.
Nothing here imports Flask: gunicorn's configuration uses it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sensor_gateway.config import Config, ConfigError

PREFIX = "sgw_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# A token given to `token add --stdin` must carry about as much entropy as ours.
MIN_TOKEN_CHARS = 32
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
VERSION = 1


class TokenError(Exception):
    """A token command that cannot be done; the message says why."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise TokenError(
            f"bad token name {name!r}: 1-64 characters, letters, digits and _ . @ -, "
            "starting with a letter or digit"
        )
    return name


def check_token_text(token: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.match(token):
        raise TokenError(
            f"a token must be at least {MIN_TOKEN_CHARS} printable characters without spaces"
        )
    return token


# The dashboard's session secret (see sensor_gateway.api.session). It lives here,
# not in the api package, so gunicorn's master can make it without importing the
# app (whose metrics must be created in the workers, after the multiprocess setup).
SESSION_SECRET_ENV = "SENSOR_GATEWAY_SESSION_KEY"


def session_secret() -> bytes:
    """This process's session secret; made on first use unless a parent made one
    (gunicorn's master does, so that every worker signs with the same)."""
    if not os.environ.get(SESSION_SECRET_ENV):
        os.environ[SESSION_SECRET_ENV] = secrets.token_hex(32)
    return bytes.fromhex(os.environ[SESSION_SECRET_ENV])


def tokens_path(cfg: Config) -> Path:
    p = Path(cfg.api.tokens_file)
    return p if p.is_absolute() else cfg.base_dir / p


# -- the file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str
    created: str


def _parse(text: str, path: Path) -> list[Token]:
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"expected an object with version {VERSION}")
        out = []
        for entry in data["tokens"]:
            digest = entry["sha256"]
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise ValueError(f"bad sha256 for {entry.get('name')!r}")
            out.append(Token(str(entry["name"]), digest, str(entry.get("created", ""))))
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"{path}: not a token file: {exc}") from exc


def read_tokens(path: Path) -> list[Token]:
    """The tokens in ``path``; none when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}") from exc
    return _parse(text, path)


def _write_tokens(path: Path, tokens: list[Token]) -> None:
    """Atomically replace ``path``, keeping its owner, group and mode (≤ 0640)."""
    body = {
        "version": VERSION,
        "tokens": [{"name": t.name, "sha256": t.sha256, "created": t.created} for t in tokens],
    }
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    mode = (st.st_mode & 0o640) if st is not None else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, st.st_uid, st.st_gid)
            except PermissionError:
                raise TokenError(
                    f"cannot keep {path}'s owner and group (uid {st.st_uid}, gid {st.st_gid}); "
                    "run this as root or as its owner"
                ) from None
        with os.fdopen(fd, "w") as f:
            fd = -1
            json.dump(body, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = ""
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def _locked(path: Path):  # type: ignore[no-untyped-def]
    """Serialise read-modify-write cycles: flock on the folder (no extra file)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise TokenError(f"folder {path.parent} does not exist") from None
        raise TokenError(f"cannot open {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add(path: Path, name: str, token: str | None = None) -> tuple[str, bool]:
    """Store a token under ``name``; returns (token, changed).

    Without ``token`` a new one is made, and ``name`` must be new. With one
    (``--stdin``: a token generated elsewhere, e.g. by Ansible on the
    controller) the name's hash is set to it: unchanged if it already is.
    """
    check_name(name)
    if token is not None:
        check_token_text(token)
    with _locked(path):
        tokens = read_tokens(path)
        existing = next((t for t in tokens if t.name == name), None)
        if token is None:
            if existing is not None:
                raise TokenError(
                    f"a token named {name!r} exists; revoke it first "
                    f"(sensor-gateway token revoke {name})"
                )
            token = new_token()
        digest = hash_token(token)
        if existing is not None and hmac.compare_digest(existing.sha256, digest):
            return token, False
        if any(hmac.compare_digest(t.sha256, digest) for t in tokens if t.name != name):
            raise TokenError("that token is already stored under another name")
        tokens = [t for t in tokens if t.name != name] + [Token(name, digest, _now())]
        _write_tokens(path, tokens)
    return token, True


def revoke(path: Path, name: str) -> bool:
    """Remove the token named ``name``; False when there was none."""
    with _locked(path):
        tokens = read_tokens(path)
        kept = [t for t in tokens if t.name != name]
        if len(kept) == len(tokens):
            return False
        _write_tokens(path, kept)
    return True


# -- what the API holds -------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The tokens at one moment: what a request is checked against."""

    names: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()
    # Whether the file exists (with every token revoked, it still closes the API).
    exists: bool = False
    # Why the file could not be read (requests needing a token are then refused).
    error: str | None = None

    def __len__(self) -> int:
        return len(self.digests)

    def match(self, token: str) -> str | None:
        """The name of the stored token equal to ``token``, or None. Every stored
        hash is compared (hmac.compare_digest), whichever matches."""
        digest = hash_token(token)
        found = None
        for name, stored in zip(self.names, self.digests, strict=True):
            if hmac.compare_digest(stored, digest):
                found = name
        return found


class TokenStore:
    """The token file as the API sees it: one stat per request, read again when
    it changed (inode, mtime, ctime or size). A missing file holds no tokens; an
    unreadable or malformed one is an error (fail closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._key: tuple[int, ...] | None = (-2,)  # never looked
        self._snapshot = Snapshot()

    def _stat_key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return (-1, exc.errno or 0)
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def current(self) -> Snapshot:
        key = self._stat_key()
        if key == self._key:
            return self._snapshot
        with self._lock:
            if key != self._key:
                try:
                    tokens = read_tokens(self.path) if key is not None else []
                    snap = Snapshot(
                        tuple(t.name for t in tokens),
                        tuple(t.sha256 for t in tokens),
                        exists=key is not None,
                    )
                except TokenError as exc:
                    snap = Snapshot(exists=True, error=str(exc))
                self._snapshot, self._key = snap, key
            return self._snapshot


# -- the policy ---------------------------------------------------------------------------


def bind_host(bind: str) -> str | None:
    """The host part of ``api.bind``; None for a Unix socket."""
    if bind.startswith("unix:"):
        return None
    if bind.startswith("fd://"):
        return ""
    host, sep, _port = bind.rpartition(":")
    if not sep:
        host = bind
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def address_is_loopback(addr: str | None) -> bool:
    if not addr:
        return False
    if addr.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def bind_is_local(bind: str) -> bool:
    """True for 127.0.0.0/8, ::1, localhost and Unix sockets; an empty host,
    0.0.0.0, ::, a LAN address or any other name serves beyond loopback."""
    host = bind_host(bind)
    return host is None or address_is_loopback(host)


def enforced(cfg: Config, tokens: Snapshot) -> bool:
    """Whether requests (but /healthz) need a token: beyond loopback, or once the
    token file exists (even with every token revoked: revoking the last token
    must not open the API), unless api.allow_anonymous."""
    if cfg.api.allow_anonymous:
        return False
    return not bind_is_local(cfg.api.bind) or tokens.exists


def check_startup(cfg: Config, read_files: bool = True) -> str:
    """Raise ConfigError naming the keys when the API must not start; else say
    what the access policy is (one line, for the log)."""
    path = tokens_path(cfg)
    local = bind_is_local(cfg.api.bind)
    if read_files:
        for key in ("tls_certfile", "tls_keyfile"):
            name = getattr(cfg.api, key)
            if name:
                p = cfg.credential_path(name)
                try:
                    with open(p, "rb"):
                        pass
                except OSError as exc:
                    raise ConfigError(f"api.{key}: cannot read {p}: {exc.strerror}") from exc
    if cfg.api.allow_anonymous:
        where = "on loopback only" if local else f"beyond loopback ({cfg.api.bind})"
        return f"no access control (api.allow_anonymous = true), serving {where}"
    if not read_files and not path.exists():
        tokens: list[Token] = []
    elif not read_files:
        return f"bearer tokens from {path} (not read: --no-secrets)"
    else:
        try:
            tokens = read_tokens(path)
        except TokenError as exc:
            raise ConfigError(f"api.tokens_file: {exc}") from exc
    if not local and not tokens:
        raise ConfigError(
            f"api.bind = {cfg.api.bind!r} serves beyond loopback, but there is no API token "
            f"in {path} (api.tokens_file): create one with `sensor-gateway token add NAME`, "
            "or set api.allow_anonymous = true to serve without access control"
        )
    if path.exists():
        return f"bearer token required ({len(tokens)} in {path}); /healthz open"
    return f"bound to loopback only and no {path} yet: open to local clients"
