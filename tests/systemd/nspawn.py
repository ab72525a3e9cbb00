"""A real systemd to test units in: a debootstrap'd Debian booted with systemd-nspawn.

PID 1 on the build machines is not systemd, so unit files are tested inside a
container whose PID 1 is (see docs/ARCHITECTURE.md, "Testing the units"). This
module is a small library for that; the systemd tests (``tests/systemd``) and
the Ansible end-to-end run (``make e2e``) both use it. It needs root,
``systemd-container`` and ``debootstrap``, and no D-Bus or machined on the host.

Root file system (built once, cached)::

    rootfs = build_rootfs()                     # default packages, cached
    rootfs = build_rootfs(include=[*DEFAULT_PACKAGES, "openssh-server"])

``build_rootfs`` runs ``debootstrap --variant=minbase`` into
``$SG_ROOTFS_CACHE`` (default ``/var/cache/sensor-gateway``), in a folder
named after the suite and a hash of the package list, so each distinct list
is built once (about a minute) and reused; a lock file serialises concurrent
builders and a half-built tree is never used. The mirror is the one apt uses
on the host (``debian_mirror()``), or ``$SG_DEBIAN_MIRROR``.

Containers (booted from a throwaway copy; the cached tree is never changed)::

    with Container("sgtest", rootfs) as c:        # private network: loopback only
        c.run("systemctl", "start", "mosquitto")  # CompletedProcess; check=True raises
        c.systemctl("is-active", "mosquitto", check=False).stdout
        c.is_active("mosquitto"); c.show("mosquitto", "MainPID", "StatusText")
        c.sh("echo hi > /tmp/x")                  # a sh -ec script; returns stdout
        p = c.popen("long-command", env={...})    # subprocess.Popen, not waited for
        c.put_file("/etc/foo.conf", "text", mode=0o644, owner="root:root")
        c.copy_in(host_path, "/opt/x")            # file or directory
        c.host_path("/etc/foo.conf")              # the same file seen from the host
        c.journal("sensor-ingest", "-p", "warning")
        c.wait_for(lambda: ..., timeout=30, what="...")

    Container(name, rootfs, network="veth", veth=VethNet("10.231.7.0"), nat=True)
    with booted("sgtest") as c: ...               # build_rootfs() + Container

``Container(...)`` parameters:

- ``name``: machine name, 1-11 of ``[a-z0-9-]`` (``ve-<name>`` must fit an
  interface name); a cgroup ``nspawn-<name>`` is made under every host cgroup
  hierarchy so that two containers can run at once, and removed on ``stop()``.
  Use a name unique to the run (e.g. with the PID) when others may be running.
- ``rootfs``: the cached tree; ``copy=True`` (default) boots a copy made under
  ``workdir`` (default: a temp folder; reflinks where the file system has
  them), ``copy=False`` boots the tree itself (to keep state across boots, or
  to build a derived image: then pass a tree of your own, not the cache).
- ``network``: ``"private"`` (``--private-network``: the container's services
  never take host ports), ``"veth"`` (``--network-veth``: a /30 on
  ``ve-<name>``/``host0``, see :class:`VethNet`; ``nat=True`` adds ip_forward
  plus an iptables MASQUERADE rule and the host's resolv.conf so apt works
  inside, the rule removed on ``stop()``) or ``"host"`` (shares the host
  network: services then take host ports).
- ``binds`` / ``binds_ro``: ``{host_path: container_path}``.
- ``extra_args``: more ``systemd-nspawn`` arguments.
- ``boot_timeout``: seconds for PID 1 to appear and for the boot to finish.

``boot()`` (called by ``__enter__``) starts ``systemd-nspawn --register=no
--keep-unit -b`` and waits until ``systemctl is-system-running`` answers
``running`` or ``degraded``. Commands enter the container with ``nsenter -a``
at its PID 1 (``c.leader``, a host PID); ``machinectl`` and ``systemctl -M``
do not work here. The console goes to ``<workdir>/console.log``
(``console_tail()``). ``stop()`` (``__exit__``) powers the container off
(``SIGRTMIN+4`` to its PID 1, SIGKILL after a timeout), kills anything left
in its cgroups, and removes the copy, the cgroups and the NAT rule;
``SG_KEEP_CONTAINER=1`` keeps the workdir (console log) for a post-mortem.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = "bookworm"
DEFAULT_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "mosquitto",
    "mosquitto-clients",
    "redis-server",
    "iproute2",
    "curl",
    "ca-certificates",
)
CACHE_DIR = Path(os.environ.get("SG_ROOTFS_CACHE", "/var/cache/sensor-gateway"))


class NspawnError(RuntimeError):
    pass


def require_tools() -> None:
    """Raise unless we are root with systemd-nspawn, nsenter and debootstrap available."""
    if os.geteuid() != 0:
        raise NspawnError("systemd containers need root")
    missing = [t for t in ("systemd-nspawn", "nsenter", "debootstrap") if not shutil.which(t)]
    if missing:
        raise NspawnError(
            f"missing {', '.join(missing)}: apt-get install -y systemd-container debootstrap"
        )


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (``$SG_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("SG_DEBIAN_MIRROR")
    if env:
        return env
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.iterdir())
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1)
            if "debian" in uri and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def rootfs_path(suite: str = SUITE, include: Sequence[str] = DEFAULT_PACKAGES) -> Path:
    key = hashlib.sha256(" ".join(sorted(set(include))).encode()).hexdigest()[:10]
    return CACHE_DIR / f"rootfs-{suite}-{key}"


def build_rootfs(
    suite: str = SUITE,
    include: Sequence[str] = DEFAULT_PACKAGES,
    mirror: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Return a cached debootstrap'd tree with ``include`` installed, building it once."""
    require_tools()
    dest = rootfs_path(suite, include)
    if (dest / ".complete").exists():
        return dest
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").exists():
            return dest
        tmp = dest.with_name(dest.name + ".building")
        if tmp.exists():
            shutil.rmtree(tmp)
        mirror = mirror or debian_mirror()
        log(f"debootstrap {suite} into {dest} from {mirror} (once; about a minute)")
        t0 = time.monotonic()
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(include)}",
                suite,
                str(tmp),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _prepare_tree(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        (dest / ".complete").write_text(f"{suite} {' '.join(sorted(include))}\n")
        log(f"rootfs ready in {time.monotonic() - t0:.0f}s")
    return dest


def _prepare_tree(root: Path) -> None:
    """Make a fresh tree boot quietly and quickly in a container."""
    (root / "etc/hostname").write_text("sgtest\n")
    # Let the root console and nsenter work without a password prompt.
    (root / "etc/securetty").unlink(missing_ok=True)
    # Drop apt's downloaded .debs: the tree is copied for every boot.
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # Services the tests start themselves; nothing should race them at boot.
    for unit in ("mosquitto.service", "redis-server.service"):
        for link in (root / "etc/systemd/system").glob(f"*.wants/{unit}"):
            link.unlink()


def _copy_tree(src: Path, dst: Path) -> None:
    """A throwaway copy: reflinks where the file system has them, else a plain copy."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)


@dataclass
class VethNet:
    """A /30 for ``--network-veth``: host gets .1, the container .2 (on ``host0``)."""

    network: str = "10.231.7.0"

    def _addr(self, n: int) -> str:
        a, b, c, d = (int(x) for x in self.network.split("."))
        return f"{a}.{b}.{c}.{d + n}"

    @property
    def host(self) -> str:
        return self._addr(1)

    @property
    def container(self) -> str:
        return self._addr(2)

    @property
    def cidr(self) -> str:
        return f"{self.network}/30"


class Container:
    """A booted systemd-nspawn container; see the module docstring."""

    PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def __init__(
        self,
        name: str,
        rootfs: Path,
        *,
        copy: bool = True,
        workdir: Path | None = None,
        network: str = "private",
        veth: VethNet | None = None,
        nat: bool = False,
        binds: Mapping[str | Path, str] | None = None,
        binds_ro: Mapping[str | Path, str] | None = None,
        extra_args: Sequence[str] = (),
        boot_timeout: float = 60.0,
    ) -> None:
        if network not in ("private", "veth", "host"):
            raise ValueError(f"network must be private, veth or host, not {network!r}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,10}", name):
            # ve-<name> must fit IFNAMSIZ (15).
            raise ValueError(f"container name {name!r}: 1-11 of [a-z0-9-]")
        self.name = name
        self.rootfs = Path(rootfs)
        self.copy = copy
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"nspawn-{name}-"))
        self.network = network
        self.veth = veth or (VethNet() if network == "veth" else None)
        self.nat = nat
        self.binds = dict(binds or {})
        self.binds_ro = dict(binds_ro or {})
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.root: Path = self.rootfs
        self._cgroups: list[Path] = []
        self._nat_rule: list[str] | None = None
        self._console: Any = None

    # -- life cycle ------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cgroup_preexec(self) -> None:
        pid = str(os.getpid())
        for cg in self._cgroups:
            (cg / "cgroup.procs").write_text(pid)

    def _make_cgroups(self) -> None:
        base = Path("/sys/fs/cgroup")
        for h in ("unified", "systemd", ""):
            hier = base / h if h else base
            if h == "" and self._cgroups:
                break  # hybrid layout handled above; pure v2 only when nothing matched
            if not (hier / "cgroup.procs").exists():
                continue
            cg = hier / f"nspawn-{self.name}"
            cg.mkdir(exist_ok=True)
            self._cgroups.append(cg)

    def boot(self) -> None:
        require_tools()
        if self.copy:
            self.root = self.workdir / "root"
            _copy_tree(self.rootfs, self.root)
        self._make_cgroups()
        args = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--quiet",
            "-D",
            str(self.root),
            "-M",
            self.name,
            "--console=read-only",
            "-b",
        ]
        if self.network == "private":
            args.append("--private-network")
        elif self.network == "veth":
            args += ["--private-network", "--network-veth"]
        for host, inner in self.binds.items():
            args.append(f"--bind={host}:{inner}")
        for host, inner in self.binds_ro.items():
            args.append(f"--bind-ro={host}:{inner}")
        args += self.extra_args
        self._console = open(self.workdir / "console.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            preexec_fn=self._cgroup_preexec,
        )
        self.leader = self._wait_leader()
        self._wait_running()
        if self.network == "veth":
            self._setup_veth()

    def _wait_leader(self) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(
                    f"systemd-nspawn exited with {self.proc.returncode}: {self.console_tail()}"
                )
            kids = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
            ).stdout.split()
            for k in kids:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                        return int(k)
            time.sleep(0.05)
        raise NspawnError(f"container {self.name}: no PID 1 after {self.boot_timeout}s")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run("systemctl", "is-system-running", check=False, timeout=10)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise NspawnError(f"container {self.name} did not finish booting (state {state!r})")

    def _setup_veth(self) -> None:
        assert self.veth is not None
        v = self.veth
        host_if = f"ve-{self.name}"
        subprocess.run(["ip", "addr", "add", f"{v.host}/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        self.run("ip", "addr", "add", f"{v.container}/30", "dev", "host0")
        self.run("ip", "link", "set", "host0", "up")
        self.run("ip", "route", "replace", "default", "via", v.host)
        if self.nat:
            if not shutil.which("iptables"):
                raise NspawnError("nat=True needs iptables on the host (apt-get install iptables)")
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            rule = ["POSTROUTING", "-s", v.cidr, "!", "-d", v.cidr, "-j", "MASQUERADE"]
            subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True)
            self._nat_rule = rule
            resolv = Path("/etc/resolv.conf").read_text()
            self.put_file("/etc/resolv.conf", resolv)

    def stop(self, timeout: float = 30.0) -> None:
        """Power off (SIGRTMIN+4 to PID 1), then clean up all that boot() made."""
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.leader = 0
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._nat_rule is not None:
            subprocess.run(["iptables", "-t", "nat", "-D", *self._nat_rule], check=False)
            self._nat_rule = None
        # The host end of the veth disappears with the container's namespace.
        for cg in reversed(self._cgroups):
            self._remove_cgroup(cg)
        self._cgroups.clear()
        if self.copy and self.root != self.rootfs and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if self._own_workdir and not os.environ.get("SG_KEEP_CONTAINER"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _remove_cgroup(cg: Path, timeout: float = 15.0) -> None:
        """Kill what is left in the container's cgroup tree, then remove it, deepest first."""
        if not cg.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*dirs, cg]:
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            try:
                for d in dirs:
                    if d.exists():
                        d.rmdir()
                cg.rmdir()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    print(f"nspawn: could not remove {cg}: {exc}")
                    return
                time.sleep(0.2)

    # -- inside ----------------------------------------------------------------------

    def _enter(self) -> list[str]:
        if not self.leader:
            raise NspawnError(f"container {self.name} is not running")
        return ["nsenter", "-t", str(self.leader), "-a", "--"]

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (a fresh login-less environment)."""
        environ = {
            "PATH": self.PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
            **(env or {}),
        }
        cmd = [*self._enter(), "env", "-i", *(f"{k}={v}" for k, v in environ.items()), *argv]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise NspawnError(
                f"in {self.name}: {shlex.join(argv)} exited {r.returncode}\n"
                f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
            )
        return r

    def popen(
        self, *argv: str, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start a command inside the container without waiting for it."""
        environ = {"PATH": self.PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        cmd = [*self._enter(), "env", "-i", *(f"{k}={v}" for k, v in environ.items()), *argv]
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(cmd, text=True, **kwargs)

    def sh(self, script: str, check: bool = True, timeout: float | None = 120.0) -> str:
        """Run a shell script inside; returns its stdout."""
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def is_active(self, unit: str) -> str:
        return self.systemctl("is-active", unit, check=False).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *args: str) -> str:
        cmd = ["journalctl", "--no-pager", "-o", "short-monotonic"]
        if unit:
            cmd += ["-u", unit]
        return self.run(*cmd, *args, check=False).stdout

    def host_path(self, inner: str) -> Path:
        """Where a container path is visible from the host (through PID 1's root)."""
        if not self.leader:
            return self.root / inner.lstrip("/")
        return Path(f"/proc/{self.leader}/root") / inner.lstrip("/")

    def put_file(
        self, inner: str, content: str | bytes, mode: int = 0o644, owner: str = "root:root"
    ) -> None:
        data = content.encode() if isinstance(content, str) else content
        self.run("mkdir", "-p", str(Path(inner).parent))
        p = self.host_path(inner)
        p.unlink(missing_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        self.run("chown", owner, inner)

    def copy_in(self, src: str | Path, inner: str) -> None:
        """Copy a host file or directory to ``inner`` (which must not exist for a folder)."""
        self.run("mkdir", "-p", str(Path(inner).parent))
        subprocess.run(["cp", "-a", str(src), str(self.host_path(inner))], check=True)

    def wait_for(
        self,
        pred: Callable[[], Any],
        timeout: float = 30.0,
        interval: float = 0.2,
        what: str = "condition",
    ) -> Any:
        from tests.helpers import wait_for

        return wait_for(pred, timeout, interval, f"{what} (in {self.name})")

    def console_tail(self, n: int = 4000) -> str:
        p = self.workdir / "console.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


@contextlib.contextmanager
def booted(name: str, rootfs: Path | None = None, **kwargs: Any) -> Iterator[Container]:
    """``with booted("sgtest") as c:`` — build (or reuse) the default rootfs and boot it."""
    with Container(name, rootfs or build_rootfs(), **kwargs) as c:
        yield c


if __name__ == "__main__":
    import sys

    require_tools()
    print(build_rootfs())
    sys.exit(0)
