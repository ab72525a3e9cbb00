"""Fast checks of deploy/ansible that need Ansible but no container (run by default).

- the mongodb role's engine ``auto`` picks MongoDB on amd64 with AVX and on
  ARMv8.2-A (Pi 5), FerretDB on a Pi 4, armv7 and amd64 without AVX;
- ``ansible-lint --profile production`` passes;
- every ``Documentation=`` of the units names a file the sensor_gateway role
  installs from this checkout (make e2e checks they are on the host).
Skipped when the ``deploy`` extra (ansible, ansible-lint) is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not installed (pip install -e '.[deploy]'; make test does)")
    return str(path)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1"}


def test_engine_auto_choice() -> None:
    r = subprocess.run(
        [_tool("ansible-playbook"), "-c", "local", "-i", "localhost,", "engine_auto.yml"],
        cwd=Path(__file__).parent / "fixtures",
        env={**_env(), "ANSIBLE_LOCALHOST_WARNING": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = dict(re.findall(r'"msg": "ENGINE (\S+) (\S+)"', r.stdout))
    assert got == {
        "amd64-avx": "mongodb",
        "amd64-noavx": "ferretdb",
        "pi5": "mongodb",
        "pi4": "ferretdb",
        "pi3-armv7": "ferretdb",
    }


def test_units_documentation_is_what_the_role_installs() -> None:
    import yaml

    role_vars = yaml.safe_load((ANSIBLE_DIR / "roles/sensor_gateway/vars/main.yml").read_text())
    doc_dir, docs = role_vars["sensor_gateway_doc_dir"], role_vars["sensor_gateway_docs"]
    installed = {f"file://{doc_dir}/{Path(d).name}": d for d in docs}
    named = set()
    for unit in sorted((REPO / "systemd").glob("sensor-*")):
        urls = re.findall(r"^Documentation=(.*)$", unit.read_text(), re.M)
        assert urls, f"{unit.name} has no Documentation="
        for url in " ".join(urls).split():
            assert url in installed, f"{unit.name}: {url} is not installed by the role ({docs})"
            named.add(url)
    for url in named:
        assert (REPO / installed[url]).is_file(), f"{installed[url]} is missing from the checkout"


def test_ansible_lint_production() -> None:
    r = subprocess.run(
        [_tool("ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
