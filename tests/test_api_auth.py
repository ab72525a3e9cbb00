"""API access control: bearer tokens, the loopback rules, refusing to start, TLS.

The token store and the address rules are checked as functions; the rest
against the real services: the app through Flask's WSGI client (which lets a
test pick the client address), and ``sensor-gateway api`` as a real gunicorn
process, with tokens made and revoked by the real ``sensor-gateway token``
command.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient

from devstack import REPO
from devstack.notify import NotifySocket
from devstack.stack import Stack
from sensor_gateway import tokens
from sensor_gateway.api import create_app
from sensor_gateway.config import ConfigError, build
from tests.api_helpers import free_port, wait_http
from tests.helpers import Gateway, wait_for

PROBLEM = "application/problem+json"
OUTSIDE = "192.0.2.10"  # TEST-NET-1: a client that is not on loopback


def token_cmd(gw: Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``sensor-gateway -c <gw's config> token ...`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "-c", str(gw.write_config()), "token", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )


def add_token(gw: Gateway, name: str) -> str:
    r = token_cmd(gw, "add", name)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("sgw_") and len(token) > 40
    assert "only time it is shown" in r.stderr
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_401(resp: Any, *words: str) -> dict[str, Any]:
    status = getattr(resp, "status_code", None)
    assert status == 401, resp
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith(PROBLEM), ctype
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    body = resp.get_json(force=True) if hasattr(resp, "get_json") else resp.json()
    for w in words:
        assert w in body["detail"], body
    return body


# -- the token store ----------------------------------------------------------------------


def test_store_keeps_hashes_only_written_0600_atomically(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens.json"
    token, changed = tokens.add(path, "alice")
    assert changed and token.startswith("sgw_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text and tokens.hash_token(token) in text
    assert [t.name for t in tokens.read_tokens(path)] == ["alice"]
    # A name is made once; revoke first.
    with pytest.raises(tokens.TokenError, match="exists; revoke it first"):
        tokens.add(path, "alice")
    # A deployment's group-readable file keeps its mode (never more than 0640).
    os.chmod(path, 0o644)
    tokens.add(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".api-tokens.json.*")), "temporary file left behind"
    assert tokens.revoke(path, "alice") and not tokens.revoke(path, "alice")
    assert [t.name for t in tokens.read_tokens(path)] == ["bob"]


def test_store_given_token_is_idempotent_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    given = "x" * 40
    assert tokens.add(path, "ci", given) == (given, True)
    assert tokens.add(path, "ci", given) == (given, False)
    with pytest.raises(tokens.TokenError, match="already stored under another name"):
        tokens.add(path, "other", given)
    with pytest.raises(tokens.TokenError, match="at least 32"):
        tokens.add(path, "short", "abc")
    with pytest.raises(tokens.TokenError, match="bad token name"):
        tokens.add(path, "no spaces", None)


def test_snapshot_rereads_on_change_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    store = tokens.TokenStore(path)
    assert len(store.current()) == 0 and store.current().error is None
    token, _ = tokens.add(path, "a")
    assert store.current().match(token) == "a"
    assert store.current().match(token + "x") is None
    tokens.revoke(path, "a")
    assert store.current().match(token) is None
    path.write_text("{not json")
    assert "not a token file" in (store.current().error or "")


@pytest.mark.parametrize(
    ("bind", "local"),
    [
        ("127.0.0.1:8000", True),
        ("127.1.2.3:8000", True),
        ("localhost:8000", True),
        ("[::1]:8000", True),
        ("unix:/run/sensor-api.sock", True),
        ("0.0.0.0:8000", False),
        ("[::]:8000", False),
        (":8000", False),
        ("192.168.1.20:8000", False),
        ("gateway.local:8000", False),
        ("[::ffff:127.0.0.1]:8000", True),
    ],
)
def test_bind_beyond_loopback(bind: str, local: bool) -> None:
    assert tokens.bind_is_local(bind) is local


@pytest.mark.parametrize(
    ("addr", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("192.0.2.10", False),
        ("::ffff:192.0.2.10", False),
        ("", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_client_address_rule(addr: str | None, loopback: bool) -> None:
    assert tokens.address_is_loopback(addr) is loopback


def test_startup_check_names_the_keys(tmp_path: Path) -> None:
    def cfg(**api: Any) -> Any:
        return build({"api": {"tokens_file": str(tmp_path / "t.json"), **api}})

    with pytest.raises(ConfigError) as e:
        tokens.check_startup(cfg(bind="0.0.0.0:8000"))
    for words in ("api.bind", "beyond loopback", "api.tokens_file", "api.allow_anonymous"):
        assert words in str(e.value)
    assert "no access control" in tokens.check_startup(
        cfg(bind="0.0.0.0:8000", allow_anonymous=True)
    )
    assert "loopback only" in tokens.check_startup(cfg(bind="127.0.0.1:8000"))
    tokens.add(tmp_path / "t.json", "a")
    assert "bearer token required" in tokens.check_startup(cfg(bind="0.0.0.0:8000"))
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(ConfigError, match="api.tokens_file: .*not a token file"):
        tokens.check_startup(cfg(bind="127.0.0.1:8000"))
    with pytest.raises(ConfigError, match="api.tls_certfile, api.tls_keyfile: set both"):
        cfg(tls_certfile="cert.pem")
    with pytest.raises(ConfigError, match="api.tls_certfile: cannot read"):
        tokens.check_startup(cfg(tls_certfile="nope.pem", tls_keyfile="nope.key"))


def test_check_config_refuses_beyond_loopback_without_token(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sensor_gateway", "-c", str(conf), "check-config"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    conf.write_text('[api]\nbind = "0.0.0.0:8000"\n')
    r = check()
    assert r.returncode == 2
    assert "api.allow_anonymous = true" in r.stderr and "sensor-gateway token add" in r.stderr
    conf.write_text('[api]\nbind = "0.0.0.0:8000"\nallow_anonymous = true\n')
    r = check()
    assert r.returncode == 0 and "no access control" in r.stdout, r.stderr
    # The default tokens_file is next to the configuration file.
    conf.write_text('[api]\nbind = "0.0.0.0:8000"\n')
    tokens.add(tmp_path / "api-tokens.json", "ops")
    r = check()
    assert r.returncode == 0 and "bearer token required" in r.stdout, r.stderr


def test_token_command_help_and_list_never_prints_secrets(tmp_path: Path, stack: Stack) -> None:
    gw = Gateway(stack, tmp_path, uuid.uuid4().hex[:8])
    gw.set(api={"tokens_file": str(tmp_path / "t.json")})
    r = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "token", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0 and "add" in r.stdout and "revoke" in r.stdout
    token = add_token(gw, "grafana")
    listed = token_cmd(gw, "list")
    assert listed.returncode == 0 and "grafana" in listed.stdout
    assert token not in listed.stdout + listed.stderr
    assert tokens.hash_token(token) not in listed.stdout
    missing = token_cmd(gw, "revoke", "nobody")
    assert missing.returncode == 1 and "no token named 'nobody'" in missing.stderr
    assert token_cmd(gw, "revoke", "nobody", "--missing-ok").returncode == 0
    r = token_cmd(gw, "add", "ansible", "--stdin", stdin="y" * 40 + "\n")
    assert r.returncode == 0 and "stored" in r.stdout
    r = token_cmd(gw, "add", "ansible", "--stdin", stdin="y" * 40 + "\n")
    assert r.returncode == 0 and "unchanged" in r.stdout


# -- the app over the real services ---------------------------------------------------------


@pytest.fixture
def agw(stack: Stack, tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(stack, tmp_path, uuid.uuid4().hex[:8])
    g.set(api={"tokens_file": str(tmp_path / "api-tokens.json")})
    yield g
    g.close()


def client_of(gw: Gateway) -> FlaskClient:
    return create_app(gw.cfg).test_client()


def outside(client: FlaskClient, path: str, **kw: Any) -> Any:
    return client.get(path, environ_base={"REMOTE_ADDR": OUTSIDE}, **kw)


def test_loopback_without_tokens_is_open(agw: Gateway) -> None:
    c = client_of(agw)
    assert c.get("/readings/latest").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_tokens_required_once_one_exists_and_revoke_takes_effect(agw: Gateway) -> None:
    c = client_of(agw)
    assert c.get("/readings/latest").status_code == 200
    token = add_token(agw, "alice")
    # No restart, no new app: the next request sees the new file.
    body = assert_401(c.get("/readings/latest"), "bearer token", "Authorization: Bearer")
    assert body["status"] == 401 and body["title"] == "Unauthorized"
    assert c.get("/readings/latest", headers=bearer(token)).status_code == 200
    assert c.get("/sensors", headers=bearer(token)).status_code == 200
    r = c.get("/readings/latest", headers=bearer(token + "x"))
    assert_401(r, "invalid bearer token")
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    r = c.get("/readings/latest", headers={"Authorization": f"Basic {token}"})
    assert_401(r, "malformed Authorization header")
    assert_401(c.get("/readings/latest", headers={"Authorization": "Bearer "}), "malformed")
    # Unknown routes are not revealed to strangers.
    assert_401(c.get("/no-such-route"))
    assert c.get("/no-such-route", headers=bearer(token)).status_code == 404
    # Always open: liveness.
    assert c.get("/healthz").status_code == 200
    assert outside(c, "/healthz").status_code == 200
    # Revoked through the real command: refused from the next request on.
    r = token_cmd(agw, "revoke", "alice")
    assert r.returncode == 0, r.stderr
    assert_401(c.get("/readings/latest", headers=bearer(token)), "unknown or revoked")


def test_metrics_needs_token_or_loopback_client(agw: Gateway) -> None:
    agw.set(api={"bind": "0.0.0.0:8000"})
    token = add_token(agw, "prometheus")
    c = client_of(agw)
    assert c.get("/metrics").status_code == 200  # loopback client, no token
    assert_401(outside(c, "/metrics"))
    assert outside(c, "/metrics", headers=bearer(token)).status_code == 200
    # Other routes need the token from loopback too.
    assert_401(c.get("/readyz"))
    assert_401(outside(c, "/readings/latest"))
    assert outside(c, "/readings/latest", headers=bearer(token)).status_code == 200
    # A forwarding header does not make a client local.
    assert_401(outside(c, "/metrics", headers={"X-Forwarded-For": "127.0.0.1"}))


def test_beyond_loopback_every_token_revoked_is_closed_not_open(agw: Gateway) -> None:
    agw.set(api={"bind": "0.0.0.0:8000"})
    token = add_token(agw, "only")
    c = client_of(agw)
    assert outside(c, "/sensors", headers=bearer(token)).status_code == 200
    assert token_cmd(agw, "revoke", "only").returncode == 0
    assert_401(outside(c, "/sensors"))
    assert_401(c.get("/sensors"))


def test_allow_anonymous_opens_everything(agw: Gateway) -> None:
    agw.set(api={"bind": "0.0.0.0:8000", "allow_anonymous": True})
    c = client_of(agw)
    assert outside(c, "/readings/latest").status_code == 200
    assert outside(c, "/metrics").status_code == 200


def test_unreadable_token_file_fails_closed(agw: Gateway) -> None:
    Path(agw.cfg.api.tokens_file).write_text("{oops")
    c = client_of(agw)
    r = c.get("/readings/latest")
    assert r.status_code == 503 and r.mimetype == PROBLEM
    assert "token file" in r.get_json()["detail"]
    assert c.get("/healthz").status_code == 200


def test_metric_labels_never_take_request_values(agw: Gateway) -> None:
    c = client_of(agw)
    junk = f"/junk-{uuid.uuid4().hex}"
    c.open(junk + "?q=" + uuid.uuid4().hex, method="FROBNICATE")
    c.get(f"/sensors/{uuid.uuid4().hex}/latest")
    c.get("/readings/latest?limit=" + uuid.uuid4().hex)
    text = c.get("/metrics").get_data(as_text=True)
    assert junk not in text and "FROBNICATE" not in text
    assert 'method="other",route="<unmatched>"' in text
    assert 'route="/sensors/<sensor_id>/latest"' in text
    labels = [ln for ln in text.splitlines() if ln.startswith("sensor_api_requests_total{")]
    assert all(uuid_hex_free(ln) for ln in labels), labels


def uuid_hex_free(line: str) -> bool:
    return re.search(r"[0-9a-f]{32}", line) is None


def test_openapi_declares_bearer_auth(agw: Gateway) -> None:
    spec = client_of(agw).get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


# -- `sensor-gateway api` as a real gunicorn -------------------------------------------------


def spawn_api(
    gw: Gateway, env: dict[str, str] | None = None, **api: Any
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    gw.set(api={"bind": f"127.0.0.1:{port}", "workers": 1, "threads": 2, **api})
    return gw.spawn("api", env=env), port


def test_live_gunicorn_token_then_revoke(agw: Gateway) -> None:
    token = add_token(agw, "live")
    proc, port = spawn_api(agw)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz")
    assert_401(requests.get(base + "/readings/latest", timeout=5))
    r = requests.get(base + "/readings/latest", headers=bearer(token), timeout=5)
    assert r.status_code == 200, r.text
    # /metrics from loopback needs no token.
    assert requests.get(base + "/metrics", timeout=5).status_code == 200
    assert token_cmd(agw, "revoke", "live").returncode == 0
    assert_401(requests.get(base + "/readings/latest", headers=bearer(token), timeout=5))
    log = proc.log_path.read_text()  # type: ignore[attr-defined]
    assert proc.poll() is None, log
    assert "API access: bearer token required" in log


def test_live_refuses_to_start_beyond_loopback_without_token(agw: Gateway) -> None:
    port = free_port()
    agw.set(api={"bind": f"0.0.0.0:{port}", "workers": 1})
    proc = agw.spawn("api")
    assert proc.wait(30) == 2
    out = proc.log_path.read_text()  # type: ignore[attr-defined]
    assert "serves beyond loopback" in out and "api.allow_anonymous = true" in out, out
    assert "Traceback" not in out
    # gunicorn started directly with the packaged configuration refuses the same way.
    r = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:sensor_gateway.gunicorn_conf"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SENSOR_GATEWAY_CONFIG": str(agw.write_config()),
        },
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "serves beyond loopback" in r.stderr and "Traceback" not in r.stderr


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (none on an isolated box)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def test_live_beyond_loopback_with_token_and_allow_anonymous(agw: Gateway) -> None:
    token = add_token(agw, "lan")
    port = free_port()
    agw.set(api={"bind": f"0.0.0.0:{port}", "workers": 1, "threads": 2})
    proc = agw.spawn("api")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    lan = non_loopback_address()
    if lan is not None:
        base = f"http://{lan}:{port}"
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        assert_401(requests.get(base + "/metrics", timeout=5))
        assert requests.get(base + "/metrics", headers=bearer(token), timeout=5).ok
    proc.terminate()
    assert proc.wait(30) == 0
    # allow_anonymous: starts beyond loopback with no token at all.
    assert token_cmd(agw, "revoke", "lan").returncode == 0
    port = free_port()
    agw.set(api={"bind": f"0.0.0.0:{port}", "allow_anonymous": True})
    proc = agw.spawn("api")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    assert requests.get(f"http://127.0.0.1:{port}/readings/latest", timeout=5).status_code == 200
    assert "no access control" in proc.log_path.read_text()  # type: ignore[attr-defined]


def self_signed(tmp: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` and its key, as PEM files in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-gateway test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "api.crt", tmp / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_live_tls_serves_https_and_reports_ready(agw: Gateway, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    token = add_token(agw, "tls")
    # The key by a relative name, from $CREDENTIALS_DIRECTORY as under systemd.
    creds = tmp_path / "creds"
    creds.mkdir()
    key.rename(creds / "api-tls-key")
    notify = NotifySocket(tmp_path / "notify.sock")
    messages = notify.messages
    extra = {
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "2000000",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    proc, port = spawn_api(agw, env=extra, tls_certfile=str(cert), tls_keyfile="api-tls-key")
    try:
        base = f"https://127.0.0.1:{port}"

        def up() -> requests.Response | None:
            try:
                return requests.get(base + "/healthz", verify=str(cert), timeout=2)
            except requests.RequestException:
                assert proc.poll() is None, proc.log_path.read_text()  # type: ignore[attr-defined]
                return None

        assert wait_for(up, 30, 0.2, "HTTPS /healthz").status_code == 200
        r = requests.get(base + "/readings/latest", headers=bearer(token), verify=str(cert))
        assert r.status_code == 200, r.text
        assert_401(requests.get(base + "/readings/latest", verify=str(cert), timeout=5))
        # Plain HTTP on the same port gets no answer.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
        # The master's own READY/WATCHDOG probes speak HTTPS too.
        wait_for(lambda: any("READY=1" in m for m in messages), 30, what="READY=1 over HTTPS")
        wait_for(lambda: any("WATCHDOG=1" in m for m in messages), 20, what="WATCHDOG=1")
    finally:
        notify.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_token_file_path_is_next_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never taken from $CREDENTIALS_DIRECTORY (a copy made at start outlives revocations).
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-tokens.json").write_text(json.dumps({"version": 1, "tokens": []}))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = build({"api": {}}, base_dir=tmp_path)
    assert tokens.tokens_path(cfg) == tmp_path / "api-tokens.json"
    cfg = build({"api": {"tokens_file": "/srv/t.json"}}, base_dir=tmp_path)
    assert tokens.tokens_path(cfg) == Path("/srv/t.json")
