"""Configuration: file, environment overrides, validation naming the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack import REPO
from sensor_gateway import config


def test_example_config_is_valid() -> None:
    cfg = config.load(REPO / "config" / "gateway.toml", environ={})
    assert cfg.ingest.topic == "sensors/#"
    assert len(cfg.simulator.sensors) == 4


def test_env_overrides_file(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text("[ingest]\nbatch_size = 100\n")
    cfg = config.load(
        p,
        environ={
            "SENSOR_GATEWAY_INGEST__BATCH_SIZE": "250",
            "SENSOR_GATEWAY_MQTT__HOST": "broker.local",
            "SENSOR_GATEWAY_INGEST__STATS_WINDOWS": '["2m"]',
        },
    )
    assert cfg.ingest.batch_size == 250
    assert cfg.mqtt.host == "broker.local"
    assert cfg.ingest.stats_windows == ["2m"]


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        (
            "[ingest]\nbatch_size = 'many'\n",
            {},
            "ingest.batch_size: expected an integer, got 'many'",
        ),
        ("[ingest]\nbatchsize = 5\n", {}, "ingest.batchsize: unknown key"),
        ("[nope]\na = 1\n", {}, "unknown section [nope]"),
        ("", {"SENSOR_GATEWAY_INGEST__BATCH_SIZE": "0"}, "ingest.batch_size: must be > 0, got 0"),
        ("[ingest]\nmax_held_mb = 0\n", {}, "ingest.max_held_mb: must be > 0, got 0"),
        ("[ingest]\nmax_held_mb = 0.5\n", {}, "ingest.max_held_mb: expected an integer"),
        ("", {"SENSOR_GATEWAY_FOO__BAR": "1"}, "unknown section 'foo'"),
        ("[mqtt]\nport = 70000\n", {}, "mqtt.port: not a TCP port: 70000"),
        ("[mqtt]\nprotocol = '4'\n", {}, "mqtt.protocol"),
        ("[ingest]\nstats_windows = ['5x']\n", {}, "bad window '5x'"),
        (
            "[[simulator.sensors]]\nsensor_id = 'a'\nkind = 'k'\nprofile = 'sine'\n",
            {},
            "simulator.sensors[0].profile",
        ),
        ("[mqtt\n", {}, "not valid TOML"),
    ],
)
def test_validation_names_the_bad_key(tmp_path: Path, toml: str, env: dict, message: str) -> None:
    p = tmp_path / "g.toml"
    p.write_text(toml)
    with pytest.raises(config.ConfigError) as exc:
        config.load(p, environ=env)
    assert message in str(exc.value)


def test_secret_files_resolve_in_credentials_directory(tmp_path: Path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = config.load(REPO / "config" / "gateway.toml", environ={})
    assert cfg.secret(cfg.redis.password_file) == "s3cret"
    with pytest.raises(config.ConfigError, match="cannot read secret file"):
        cfg.secret("missing-password")


def test_check_config_command(tmp_path: Path) -> None:
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "sensor_gateway",
            "-c",
            str(REPO / "config" / "gateway.toml"),
            "check-config",
            "--no-secrets",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0, good.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[api]\nworkers = -\n")
    r = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "-c", str(bad), "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "not valid TOML" in r.stderr
    bad.write_text("[api]\nworkers = 'two'\n")
    r = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "-c", str(bad), "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "api.workers: expected an integer, got 'two'" in r.stderr


def test_every_subcommand_has_help() -> None:
    for sub in ("ingest", "simulate", "check-config", "api", "stats", "migrate"):
        r = subprocess.run(
            [sys.executable, "-m", "sensor_gateway", sub, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode == 0 and "usage:" in r.stdout, (sub, r.stderr)


def test_api_knobs_are_checked() -> None:
    with pytest.raises(config.ConfigError, match="api.workers: must be > 0, got 0"):
        config.build({"api": {"workers": 0}})
    with pytest.raises(config.ConfigError, match="api.max_limit: must be 1-1000"):
        config.build({"api": {"max_limit": 5000}})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--rate", "-5"], "argument --rate: must be > 0, got -5"),
        (["simulate", "--count", "many"], "argument --count: not a number: 'many'"),
    ],
)
def test_bad_command_line_values_are_named(args: list[str], message: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", *args], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
