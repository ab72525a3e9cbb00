"""Running deploy/ansible/site.yml against a booted test container (tests/e2e).

The play reaches the container with Ansible's community.docker.nsenter
connection at its PID 1 (inventory/test-container.yml reads it from
``SG_E2E_PID``). Each run's whole output is kept in the work folder as
``playbook-<label>.log``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.systemd.nspawn import Container

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
VENV_BIN = Path(sys.executable).parent
HOST = "sge2e"  # the host of inventory/test-container.yml
# A minimal bookworm: what the playbook needs to start (python3 for Ansible's
# modules); everything else it installs itself.
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "ca-certificates", "iproute2")


@dataclass
class PlaybookRun:
    returncode: int
    out: str

    def recap(self) -> dict[str, int] | None:
        m = re.search(
            rf"^{HOST}\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
            self.out,
            re.M,
        )
        if not m:
            return None
        keys = ("ok", "changed", "unreachable", "failed")
        return dict(zip(keys, map(int, m.groups()), strict=True))

    def task_status(self, task: str) -> str | None:
        """``ok``, ``changed``, ``skipping``, ``fatal``... of the first run of the task
        whose header is ``TASK [<task>]`` (e.g. ``page_size : Read the memory page size``)."""
        m = re.search(
            rf"^TASK \[{re.escape(task)}\][^\n]*\n(?:(?!TASK \[)[^\n]*\n)*?"
            r"(ok|changed|skipping|fatal|failed): \[",
            self.out,
            re.M,
        )
        return m.group(1) if m else None

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported ``changed`` (for any item)."""
        tasks = re.split(r"^TASK \[", self.out, flags=re.M)[1:]
        return [t.split("]", 1)[0] for t in tasks if re.search(r"^changed: \[", t, re.M)]

    def ran_role(self, role: str) -> bool:
        return re.search(rf"^TASK \[{re.escape(role)} : ", self.out, re.M) is not None


def run_playbook(
    leader: int,
    work: Path,
    label: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> PlaybookRun:
    """``ansible-playbook -i inventory/test-container.yml <args> site.yml`` against the
    container whose PID 1 (on the host) is ``leader``."""
    environ = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        # Per-task timings in the playbook logs.
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        "SG_E2E_PID": str(leader),
        **(env or {}),
    }
    cmd = [
        str(VENV_BIN / "ansible-playbook"),
        "-i",
        "inventory/test-container.yml",
        *args,
        "site.yml",
    ]
    r = subprocess.run(
        cmd, cwd=ANSIBLE_DIR, env=environ, capture_output=True, text=True, timeout=timeout
    )
    out = r.stdout + r.stderr
    (work / f"playbook-{label}.log").write_text(out)
    return PlaybookRun(r.returncode, out)


def boot_container(name: str, root: Path, workdir: Path, **network: Any) -> Container:
    """Boot the test container from ``root`` (not copied: the test owns it); stopped
    again if the boot fails, so no half-booted machine is left behind."""
    workdir.mkdir(exist_ok=True)
    c = Container(name, root, copy=False, workdir=workdir, **network)
    try:
        c.boot()
    except BaseException:
        c.stop()
        raise
    return c


def fresh_root(rootfs: Path, work: Path) -> Path:
    """A copy of the cached rootfs in ``work``, for one test container to own."""
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(root)], check=True)
    return root


@contextmanager
def cleaned_up(host: Any, work: Path) -> Iterator[None]:
    """Power ``host`` off and remove ``work`` at the end, however the tests end
    (``SG_KEEP_CONTAINER=1`` keeps the folder to look into)."""
    try:
        yield
    finally:
        host.power_off()
        if os.environ.get("SG_KEEP_CONTAINER"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
