"""End to end: the page-size pre-flight (roles/page_size) on a Raspberry Pi 5 stand-in.

Debian's Redis (jemalloc) and MongoDB need 4 KiB memory pages; a Pi 5 boots
a 16 KiB-page kernel by default. site.yml's first play reads ``getconf
PAGESIZE`` on ARM hosts and either stops or switches the Pi to its 4 KiB-page
kernel (``kernel=kernel8.img`` in /boot/firmware/config.txt) and reboots.

The container (the same minimal bookworm as test_deploy.py, no network) plays
a Pi 5. What is simulated, and how:

- the architecture: ``-e ansible_architecture=aarch64`` (extra vars win over
  the gathered fact, so the role's own condition sees aarch64);
- the firmware: /boot/firmware holds the bookworm image's config.txt
  (fixtures/pi5-config.txt) and empty kernel8.img and kernel_2712.img;
- the kernel's page size: a oneshot unit run at every boot reads config.txt as
  the firmware would and writes 4096 to /run if it has the line
  ``kernel=kernel8.img`` and 16384 otherwise; ``getconf PAGESIZE`` (a shim in
  place of /usr/bin/getconf, the real one kept beside it) prints that. So the
  page size changes only with a boot, as on the board;
- the reboot: Ansible cannot follow a container through a reboot (its nsenter
  connection targets the old PID 1), so the play runs the reboot task in
  check mode (``page_size_reboot_check_mode``: the task is reached and
  reports a reboot without doing one). The in-play re-check then still reads
  16384 and fails with its message, which is what a board that did not come
  back with the 4 KiB kernel would get. The real reboot is done by the test:
  power off, boot the same tree, run the play again: it now reads 4096 and
  changes nothing.

Checked in order:

1. knob off (``page_size_switch_kernel: false``): the play fails at the
   pre-flight, before any other role, saying to add ``kernel=kernel8.img`` to
   /boot/firmware/config.txt and reboot; config.txt is left as it was. Without
   kernel8.img (not a Pi it can switch) it fails the same way, knob on or off;
2. knob on (the default): the line goes in right after ``[all]``, the reboot
   task is reached, the re-check runs;
3. after a real (container) reboot, the pre-flight on this aarch64 host with
   4096-byte pages passes untouched (``changed=0``; the line is there once).

The x86_64 case (nothing read, nothing changed) is test_deploy.py's first run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.ansible_run import (
    ROOTFS_PACKAGES,
    PlaybookRun,
    boot_container,
    cleaned_up,
    fresh_root,
    run_playbook,
)
from tests.e2e.conftest import NOTES, TIMINGS
from tests.systemd import nspawn
from tests.systemd.nspawn import Container

pytestmark = pytest.mark.e2e

NAME = "sge2epg"
CONFIG = "/boot/firmware/config.txt"
PI5_CONFIG = (Path(__file__).parent / "fixtures" / "pi5-config.txt").read_text()
AARCH64 = json.dumps({"ansible_architecture": "aarch64"})

GETCONF_SHIM = """#!/bin/sh
# Test double (tests/e2e/test_page_size.py): the page size a Raspberry Pi 5
# booted with, from /run/sg-test-pagesize (sg-test-pagesize.service).
if [ "$#" = 1 ] && { [ "$1" = PAGESIZE ] || [ "$1" = PAGE_SIZE ]; }; then
  exec cat /run/sg-test-pagesize
fi
exec /usr/bin/getconf.real "$@"
"""

PAGESIZE_UNIT = """# Test double (tests/e2e/test_page_size.py): at boot, as a Pi 5's firmware
# picks its kernel from config.txt: kernel8.img has 4 KiB pages, the default
# kernel_2712.img 16 KiB.
[Unit]
Description=Test double: the page size of the kernel config.txt boots
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'if grep -qx "kernel=kernel8.img" /boot/firmware/config.txt; \
then echo 4096; else echo 16384; fi > /run/sg-test-pagesize'

[Install]
WantedBy=sysinit.target
"""


@dataclass
class Pi5:
    work: Path
    root: Path
    container: Container | None = None
    boots: int = 0

    @property
    def c(self) -> Container:
        assert self.container is not None, "container is not running"
        return self.container

    def boot(self) -> Container:
        t0 = time.monotonic()
        self.boots += 1
        c = boot_container(NAME, self.root, self.work / f"boot{self.boots}", network="private")
        self.container = c
        TIMINGS[f"page size: boot #{self.boots}"] = time.monotonic() - t0
        return c

    def power_off(self) -> None:
        if self.container is not None:
            self.container.stop()
            self.container = None

    def play(self, label: str, *args: str) -> PlaybookRun:
        t0 = time.monotonic()
        run = run_playbook(
            self.c.leader,
            self.work,
            label,
            "-e",
            f"gateway_secrets_dir={self.work / 'secrets'}",
            "-e",
            AARCH64,
            *args,
            timeout=300,
        )
        TIMINGS[f"page size: playbook ({label})"] = time.monotonic() - t0
        return run

    def config(self) -> str:
        return self.c.run("cat", CONFIG).stdout

    def pagesize(self) -> int:
        return int(self.c.run("getconf", "PAGESIZE").stdout)


def _make_pi5(root: Path) -> None:
    firmware = root / "boot" / "firmware"
    firmware.mkdir(parents=True)
    (firmware / "config.txt").write_text(PI5_CONFIG)
    for image in ("kernel8.img", "kernel_2712.img"):
        (firmware / image).write_bytes(b"")
    getconf = root / "usr" / "bin" / "getconf"
    getconf.rename(getconf.with_name("getconf.real"))
    getconf.write_text(GETCONF_SHIM)
    getconf.chmod(0o755)
    units = root / "etc" / "systemd" / "system"
    (units / "sg-test-pagesize.service").write_text(PAGESIZE_UNIT)
    wants = units / "sysinit.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "sg-test-pagesize.service").symlink_to("../sg-test-pagesize.service")


def _flat(text: str) -> str:
    """Ansible's YAML output folds long messages: compare them with spaces collapsed."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def pi5() -> Iterator[Pi5]:
    t_all = time.monotonic()
    try:
        nspawn.require_tools()
    except nspawn.NspawnError as exc:
        pytest.fail(f"e2e cannot run here: {exc}", pytrace=False)
    rootfs = nspawn.build_rootfs(include=ROOTFS_PACKAGES)
    work = Path(tempfile.mkdtemp(prefix="sg-e2e-pi5-"))
    root = fresh_root(rootfs, work)
    _make_pi5(root)
    p = Pi5(work=work, root=root)
    print(f"\ne2e page-size work folder: {work}")
    with cleaned_up(p, work):
        p.boot()
        yield p
    TIMINGS["page size: total"] = time.monotonic() - t_all


def test_knob_off_stops_before_anything_is_installed(pi5: Pi5) -> None:
    assert pi5.pagesize() == 16384
    run = pi5.play("pi5 knob off", "-e", json.dumps({"page_size_switch_kernel": False}))
    assert run.returncode != 0, run.out[-4000:]
    assert run.task_status("page_size : Read the memory page size") == "ok"
    assert run.task_status("page_size : Stop before installing anything that cannot run here") == (
        "fatal"
    ), run.out[-4000:]
    msg = _flat(run.out)
    for words in (
        "uses 16384-byte memory pages",
        'add the line "kernel=kernel8.img" to /boot/firmware/config.txt',
        "reboot, and run the play again",
        "page_size_switch_kernel: true",
    ):
        assert words in msg, (words, run.out[-4000:])
    assert not run.ran_role("mosquitto") and not run.ran_role("redis"), run.out[-4000:]
    assert pi5.config() == PI5_CONFIG
    NOTES.append("page size, knob off: the play stopped at the pre-flight, config.txt untouched")


def test_without_the_4k_kernel_file_even_knob_on_stops(pi5: Pi5) -> None:
    """An ARM host with 16 KiB pages that is not a Pi the play can switch."""
    pi5.c.run("mv", "/boot/firmware/kernel8.img", "/boot/firmware/kernel8.img.away")
    try:
        run = pi5.play("arm64 16k without kernel8.img")
    finally:
        pi5.c.run("mv", "/boot/firmware/kernel8.img.away", "/boot/firmware/kernel8.img")
    assert run.returncode != 0, run.out[-4000:]
    assert run.task_status("page_size : Stop before installing anything that cannot run here") == (
        "fatal"
    ), run.out[-4000:]
    msg = _flat(run.out)
    assert "not a Raspberry Pi the play can switch: boot a kernel built with 4 KiB pages" in msg
    assert not run.ran_role("mosquitto")
    assert pi5.config() == PI5_CONFIG


def test_knob_on_writes_config_and_reaches_the_reboot(pi5: Pi5) -> None:
    run = pi5.play("pi5 knob on", "-e", json.dumps({"page_size_reboot_check_mode": True}))
    assert run.task_status("page_size : Stop before installing anything that cannot run here") == (
        "skipping"
    ), run.out[-4000:]
    assert run.task_status("page_size : Boot the 4 KiB-page kernel from now on") == "changed"
    assert run.task_status("page_size : Reboot into the 4 KiB-page kernel") == "changed"
    # No real reboot happened (check mode), so the re-check still reads 16 KiB and stops the play.
    assert run.task_status("page_size : Read the memory page size after the reboot") == "ok"
    assert run.task_status("page_size : Check that the 4 KiB-page kernel runs") == "fatal"
    assert "Still 16384-byte pages after the reboot" in _flat(run.out), run.out[-4000:]
    assert run.returncode != 0 and not run.ran_role("mosquitto"), run.out[-4000:]
    # The line went in right after [all], once; nothing else changed.
    assert pi5.config() == PI5_CONFIG.replace("\n[all]\n", "\n[all]\nkernel=kernel8.img\n")
    NOTES.append("page size, knob on: kernel=kernel8.img written after [all], reboot task reached")


def test_after_the_reboot_a_4k_arm_host_passes_untouched(pi5: Pi5) -> None:
    config = pi5.config()
    pi5.power_off()
    pi5.boot()
    assert pi5.pagesize() == 4096
    run = pi5.play("pi5 after reboot", "--tags", "page_size")
    recap = run.recap()
    assert run.returncode == 0 and recap, run.out[-4000:]
    assert recap["changed"] == 0 and recap["failed"] == 0, recap
    assert run.task_status("page_size : Read the memory page size") == "ok"
    assert run.task_status("page_size : Boot the 4 KiB-page kernel from now on") == "skipping"
    assert pi5.config() == config and config.count("kernel=kernel8.img") == 1
    NOTES.append(f"page size, after the reboot (4096-byte pages on aarch64): {recap}")
