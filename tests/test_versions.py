"""The FerretDB version is set in one place, and what builds or installs it agrees.

The one place is ``mongodb_ferretdb_version`` in the mongodb role's defaults
(deploy/ansible/roles/mongodb/defaults/main.yml): the role downloads that
release, or checks that the binary it is given reports it, and
``.ci/build-ferretdb.sh`` (the binary the tests and the e2e deployment run)
reads it from there. No services; the built binary is checked only if present.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = REPO / "deploy" / "ansible" / "roles" / "mongodb" / "defaults" / "main.yml"
BUILD = REPO / ".ci" / "build-ferretdb.sh"
BINARY = REPO / ".cache" / "bin" / "ferretdb"
# Files that build, install or test FerretDB, where no other release may be named.
OWNED = ("deploy", ".ci", "tests/e2e", "tests/systemd")


def role_version() -> str:
    """mongodb_ferretdb_version as Ansible reads it (YAML), without needing Ansible."""
    text = DEFAULTS.read_text()
    try:
        import yaml
    except ImportError:  # the deploy extra is not installed: the line itself
        m = re.search(r'^mongodb_ferretdb_version:\s*"?([^"\s#]+)"?\s*$', text, re.M)
        assert m, "no mongodb_ferretdb_version in the mongodb role's defaults"
        return m.group(1)
    value = yaml.safe_load(text)["mongodb_ferretdb_version"]
    # Unquoted, 1.24 would be a float: the version must stay a string.
    assert isinstance(value, str), f"mongodb_ferretdb_version is {value!r}: quote it"
    return value


def test_role_version_is_a_release_number() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", role_version()), role_version()


def test_build_script_builds_the_role_version() -> None:
    r = subprocess.run(
        [str(BUILD), "--print-version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert r.stdout.strip() == f"v{role_version()}"


def test_built_binary_is_the_role_version() -> None:
    # The script builds when the binary is missing or another version, else exits at
    # once: what it leaves is what the tests run against.
    subprocess.run([str(BUILD)], capture_output=True, timeout=900, check=True)
    r = subprocess.run(
        [str(BINARY), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert r.stdout.splitlines()[0] == f"version: v{role_version()}", (
        f"{BINARY} is stale: run .ci/build-ferretdb.sh"
    )


def test_no_other_release_is_named() -> None:
    """No file that builds, installs or tests FerretDB names another release of its
    series (e.g. 1.24.0 beside 1.24.2); the series itself ("FerretDB 1.24") is fine."""
    major, minor, _ = role_version().split(".")
    release = re.compile(rf"(?<![\d.])v?{major}\.{minor}\.\d+(?![\d.])")
    found = []
    for top in OWNED:
        for path in sorted((REPO / top).rglob("*")):
            if not path.is_file() or "secrets" in path.parts or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if release.search(line) and not (
                    path == DEFAULTS and line.startswith("mongodb_ferretdb_version:")
                ):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "FerretDB releases named outside the role's defaults:\n" + "\n".join(found)
