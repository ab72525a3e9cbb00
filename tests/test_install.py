"""The package installs clean: ``pip install .`` with no extras into a fresh
virtualenv, then its command, its example configuration and every module, with
nothing of the repository (devstack, tests, the test extras) coming along.

The install is a normal one (build isolation, dependencies resolved by pip)
from a copy of the working tree, against a wheelhouse in
``.cache/install-wheelhouse`` that is filled from PyPI whenever it lacks
something (the first run, or a changed dependency).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devstack import REPO

WHEELHOUSE = REPO / ".cache" / "install-wheelhouse"
# What a checkout holds besides its sources.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".cache",
    "var",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)

# Run by the fresh venv's python, outside the repository: import every module of
# the installed package, and try what must not be installed.
IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback
report = sys.argv[1]
import sensor_gateway
out = {"file": sensor_gateway.__file__, "modules": [], "failed": {}, "importable": {}}
for m in pkgutil.walk_packages(sensor_gateway.__path__, "sensor_gateway.",
                               onerror=lambda name: out["failed"].update({name: "walk"})):
    out["modules"].append(m.name)
    if m.name == "sensor_gateway.__main__":
        sys.argv = ["sensor-gateway", "--help"]  # it runs the command line
    try:
        importlib.import_module(m.name)
    except SystemExit as exc:
        if not (m.name == "sensor_gateway.__main__" and exc.code == 0):
            out["failed"][m.name] = f"SystemExit({exc.code!r})"
    except BaseException:
        out["failed"][m.name] = traceback.format_exc()
for name in ("devstack", "tests", "bench", "tomli_w", "pytest"):
    try:
        importlib.import_module(name)
        out["importable"][name] = True
    except ImportError:
        out["importable"][name] = False
with open(report, "w") as f:
    json.dump(out, f)
"""


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _source_modules(pkg: Path) -> set[str]:
    names = set()
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg.parent).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names - {"sensor_gateway"}


def test_pip_install_without_extras_is_self_contained(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    outside = tmp_path / "elsewhere"  # no repository on any path from here
    outside.mkdir()
    # Nothing of ours through the environment: no PYTHONPATH, no active venv.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "SENSOR_GATEWAY_"))
    }
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", venv], outside, env)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "--disable-pip-version-check", "--no-input"]

    install = [*pip, "install", "--no-index", "--find-links", WHEELHOUSE, "."]
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    r = _run(install, src, env)
    if r.returncode != 0:
        # Missing wheels: fetch them (the build backend's too), then install again.
        fill = _run(
            [*pip, "wheel", "-q", "-w", WHEELHOUSE, "setuptools>=64", "wheel", "."], src, env
        )
        assert fill.returncode == 0, fill.stderr[-3000:]
        for own in WHEELHOUSE.glob("sensor_gateway-*.whl"):
            own.unlink()  # built from this tree; only dependencies are kept
        r = _run(install, src, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    cli = venv / "bin" / "sensor-gateway"
    r = _run([cli, "--help"], outside, env)
    assert r.returncode == 0, r.stderr
    for command in ("check-config", "ingest", "api", "simulate"):
        assert command in r.stdout

    example = src / "config" / "gateway.toml"
    # --no-secrets: the example names the deployment's secret files, not here.
    r = _run([cli, "-c", example, "check-config", "--no-secrets"], outside, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "configuration OK" in r.stdout

    report = tmp_path / "imports.json"
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    r = _run(
        [py, "-I", "-c", IMPORT_ALL, report],
        outside,
        # gunicorn_conf reads the configuration when imported, and keeps its
        # metrics where this says.
        {**env, "SENSOR_GATEWAY_CONFIG": str(example), "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(report.read_text())

    installed = Path(result["file"]).parent
    assert venv in installed.parents, f"imported {installed}, not the fresh install"
    assert result["failed"] == {}, "\n".join(f"{k}: {v}" for k, v in result["failed"].items())
    assert set(result["modules"]) == _source_modules(src / "sensor_gateway")
    # The package's data (templates, Swagger UI's page, scripts, styles) came along.
    data = {
        p.relative_to(src)
        for p in (src / "sensor_gateway").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    missing = sorted(str(d) for d in data if not (installed.parent / d).is_file())
    assert not missing, f"package data not installed: {missing}"
    # The repository's tooling and the test extras stay out.
    assert result["importable"] == {
        "devstack": False,
        "tests": False,
        "bench": False,
        "tomli_w": False,
        "pytest": False,
    }
