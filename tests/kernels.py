"""Debian 12's own kernel under qemu, running the capture tests on it.

The suite runs on the host's kernel; this proves that the same BPF object,
byte for byte, also captures on Linux 6.1, the kernel Debian 12 installs
(its cloud flavour, `linux-image-6.1.0-*-cloud-amd64`, fetched with apt).

The guest's whole root is an initramfs. Debian's cloud kernel builds
virtio_blk, virtio_pci and 9p as modules, so a disk or a shared folder
would need modules loaded by an early userspace before the root exists;
an initramfs needs none: the kernel unpacks it into a tmpfs and runs
/init. It is two cpio archives joined end to end: a cached base (a
debootstrap tree with what the tests need, plus the few modules they
load) and a small one made for each run with this checkout, the BPF
object and /init. The guest has no network card (-nic none): its tests
talk over its own loopback.

/init mounts what the collector needs and runs `python3 -m tests.kernels
guest`, which loads the object itself (which send hook does the loader
choose, and what happens to a variant forced on a kernel without it),
runs the capture suites with Debian's pytest, writes one JSON report
between markers to the second serial port (a file on the host), and
powers the guest off. The host kills qemu if it outlives a deadline.

Everything is cached in build/kernels/, each part with a stamp naming its
inputs, so a changed input rebuilds that part only:

  kernel/, kernel.stamp   vmlinuz and the modules used, of one package
  root/, root.stamp       the debootstrap tree
  base.cpio, base.stamp   the tree and the modules as one archive

`python -m tests.kernels build` builds what is missing; `run` also boots
the guest once and prints its report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from tests import nspawn

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build/kernels"
OBJECT = ROOT / "build/toktra_socket.bpf.o"
QEMU = "qemu-system-x86_64"
HOST_PACKAGES = ("qemu-system-x86", "debootstrap")

KERNEL_PACKAGE = re.compile(r"^linux-image-6\.1\.0-(\d+)-cloud-amd64$")
# What the tests need in the guest, besides what debootstrap's minbase has.
# kmod loads the modules below; pytest-timeout honours the suite's timeout.
# debootstrap does not resolve virtual packages: python3-cffi-backend is
# named because it provides the cffi API that python3-zmq depends on.
GUEST_PACKAGES = (
    "python3",
    "python3-cffi-backend",
    "python3-pytest",
    "python3-pytest-timeout",
    "python3-cryptography",
    "python3-zmq",
    "python3-prometheus-client",
    "python3-requests",
    "libbpf1",
    "curl",
    "openssl",
    "iproute2",
    "ca-certificates",
    "kmod",
)
GUEST_USER = "toktra"
# sock_diag for TCP (the collector's progress reports and adoption) is a
# module in Debian's kernel; the guest loads these, in this order, at boot.
MODULES = ("kernel/net/ipv4/inet_diag.ko", "kernel/net/ipv4/tcp_diag.ko")
# Bumped when the way the tree or the archive is made changes.
LAYOUT = 1

# In the guest: where the checkout goes, and what runs there.
GUEST_SOURCE = "/opt/toktra"
GUEST_SUITES = (
    "tests/test_clienthello_capture.py",
    "tests/test_capture_e2e.py",
    "tests/test_probes.py",
)
# node id -> why it cannot run in the guest; passed to pytest as --deselect.
DESELECTED: dict[str, str] = {}
REPORT_BEGIN = "TOKTRA-KERNELS-REPORT-BEGIN"
REPORT_END = "TOKTRA-KERNELS-REPORT-END"
REPORT_PORT = "/dev/ttyS1"
PROBE_PORT = 8443  # a port the loader is told to watch; nothing listens

GUEST_MEMORY_MB = 3072
GUEST_CPUS = 2
KVM_PROBE_S = 20
# How long a boot may take in all, and the guest's pytest within it. A
# run under software emulation (TCG) takes about four minutes.
DEADLINE_S = {"kvm": 600, "tcg": 1200}
PYTEST_DEADLINE_S = {"kvm": 480, "tcg": 1050}
APT_TIMEOUT_S = 600


class Unavailable(Exception):
    """qemu cannot run here at all; the message says why."""


class BuildError(Exception):
    """The guest's kernel, tree or archive could not be made."""


class GuestError(Exception):
    """The guest did not boot, hung, or ended without a report."""


def _say(log: TextIO, *words: object) -> None:
    print("kernels:", *words, file=log, flush=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


def _stamp_matches(path: Path, want: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == want
    except (OSError, ValueError):
        return False


def _run(cmd: list[str], what: str, timeout: float = APT_TIMEOUT_S, **kw) -> str:
    """Runs a build step; its output on success, BuildError on failure."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: no result in {timeout}s") from None
    if done.returncode != 0:
        raise BuildError(
            f"{what} failed ({done.returncode}): {' '.join(cmd)}\n"
            f"{(done.stdout + done.stderr)[-1500:]}"
        )
    return done.stdout


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- the host --


def host_tools() -> None:
    """qemu and debootstrap, installed with apt when missing."""
    if os.geteuid() != 0:
        raise Unavailable("needs root to build the guest's tree and archive")
    if shutil.which(QEMU) and shutil.which("debootstrap"):
        return
    try:
        nspawn.apt_install(HOST_PACKAGES)
    except nspawn.Unavailable as e:
        raise Unavailable(str(e)) from e
    if not shutil.which(QEMU):
        raise Unavailable(f"{QEMU} still missing after installing qemu-system-x86")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time; a run composes its archive under it too."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- the kernel --


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    package: str
    version: str  # the Debian package version, e.g. 6.1.153-1

    @property
    def release(self) -> str:
        """What `uname -r` says when it runs."""
        return self.package.removeprefix("linux-image-")


def newest_kernel(log: TextIO = sys.stderr) -> KernelPackage:
    """The newest signed 6.1 cloud kernel the configured apt sources have."""

    def search() -> list[str]:
        out = _run(
            ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-.*-cloud"],
            "apt-cache search",
        )
        return [line.split(" ", 1)[0] for line in out.splitlines()]

    names = [n for n in search() if KERNEL_PACKAGE.match(n)]
    if not names:
        _say(log, "no 6.1 cloud kernel in apt's lists; apt-get update")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        names = [n for n in search() if KERNEL_PACKAGE.match(n)]
    if not names:
        raise BuildError("apt knows no linux-image-6.1.0-*-cloud-amd64 package")
    package = max(names, key=lambda n: int(KERNEL_PACKAGE.match(n).group(1)))
    shown = _run(["apt-cache", "show", "--no-all-versions", package], "apt-cache show")
    version = re.search(r"^Version: (\S+)$", shown, re.M)
    if not version:
        raise BuildError(f"apt-cache show {package} names no version")
    return KernelPackage(package, version.group(1))


def build_kernel(kernel: KernelPackage, log: TextIO = sys.stderr) -> Path:
    """vmlinuz and MODULES of `kernel`, from its .deb; cached in kernel/."""
    target = CACHE / "kernel"
    stamp = CACHE / "kernel.stamp"
    want = {**dataclasses.asdict(kernel), "modules": list(MODULES)}
    if target.is_dir() and _stamp_matches(stamp, want):
        return target
    stamp.unlink(missing_ok=True)
    _say(log, f"fetching {kernel.package} {kernel.version} with apt-get download")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        _run(
            [
                "apt-get", "download", "-q",
                # the .deb goes to a root-only directory
                "-o", "APT::Sandbox::User=root",
                f"{kernel.package}={kernel.version}",
            ],
            "apt-get download",
            cwd=tmp,
        )  # fmt: skip
        (deb,) = Path(tmp).glob("*.deb")
        tree = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], "dpkg-deb -x")
        shutil.rmtree(target, ignore_errors=True)
        (target / "modules").mkdir(parents=True)
        shutil.copy2(tree / f"boot/vmlinuz-{kernel.release}", target / "vmlinuz")
        modules = tree / "lib/modules" / kernel.release
        for module in MODULES:
            dest = target / "modules" / module
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(modules / module, dest)
    _write_atomic(stamp, json.dumps(want).encode())
    return target


# -- the guest's tree --

# Left out of the archive: documentation, translations and apt's caches
# make a third of the tree and nothing in the guest reads them.
TRIMMED = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
)


def build_root(log: TextIO = sys.stderr) -> Path:
    """The guest's Debian tree, made with debootstrap; cached in root/."""
    target = CACHE / "root"
    stamp = CACHE / "root.stamp"
    try:
        source = nspawn.mirror()
    except nspawn.Unavailable as e:
        raise BuildError(str(e)) from e
    want = {
        "suite": nspawn.SUITE,
        "mirror": source,
        "packages": list(GUEST_PACKAGES),
        "user": GUEST_USER,
        "layout": LAYOUT,
    }
    if target.is_dir() and _stamp_matches(stamp, want):
        return target
    stamp.unlink(missing_ok=True)
    try:
        nspawn.debootstrap(target, ",".join(GUEST_PACKAGES), source, log)
    except nspawn.Unavailable as e:
        raise BuildError(str(e)) from e
    # The agent runs its unprivileged stages as this user (the Makefile's
    # `user` target makes the same one on the host).
    _run(
        [
            "chroot", str(target), "useradd", "--system", "--user-group",
            "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", GUEST_USER,
        ],
        "useradd in the guest tree",
    )  # fmt: skip
    _write_atomic(stamp, json.dumps(want).encode())
    return target


# -- cpio archives (the "newc" format the kernel unpacks) --


class Cpio:
    """Writes one newc archive: directories before what they hold.

    Hard links are written as separate files, which the kernel then
    unpacks as copies; the guest's tree does not care.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0

    def _entry(self, name: str, mode: int, size: int, **kw: int) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.ino, mode, kw.get("uid", 0), kw.get("gid", 0), 1,
            kw.get("mtime", 0), size, 0, 0,
            os.major(kw.get("rdev", 0)), os.minor(kw.get("rdev", 0)),
            len(encoded), 0,
        )  # fmt: skip
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()

    def _pad(self, align: int = 4) -> None:
        self.out.write(b"\0" * (-self.out.tell() % align))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, 0)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, len(data))
        self.out.write(data)
        self._pad()

    def tree(
        self, base: Path, prefix: str = "", skip: Callable[[str], bool] | None = None
    ) -> None:
        """Everything under `base`, as `prefix/...`, owners and modes kept."""
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            here = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                path = here / name
                rel = path.relative_to(base).as_posix()
                if skip and skip(rel):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                self.path(path, f"{prefix}{rel}")

    def path(self, path: Path, name: str) -> None:
        st = os.lstat(path)
        owner = {"uid": st.st_uid, "gid": st.st_gid, "mtime": int(st.st_mtime)}
        if stat.S_ISREG(st.st_mode):
            self._entry(name, st.st_mode, st.st_size, **owner)
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.out)
            self._pad()
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path).encode()
            self._entry(name, st.st_mode, len(target), **owner)
            self.out.write(target)
            self._pad()
        else:  # directories, device nodes, fifos
            self._entry(name, st.st_mode, 0, rdev=st.st_rdev, **owner)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, 0)
        self._pad(512)


def _trimmed(rel: str) -> bool:
    return any(rel == t or rel.startswith(t + "/") for t in TRIMMED)


def build_base(root: Path, kernel: KernelPackage, modules: Path, log: TextIO) -> Path:
    """The tree and the kernel's modules as one cpio archive; cached."""
    target = CACHE / "base.cpio"
    stamp = CACHE / "base.stamp"
    want = {
        "root": json.loads((CACHE / "root.stamp").read_text()),
        "kernel": json.loads((CACHE / "kernel.stamp").read_text()),
        "layout": LAYOUT,
    }
    if target.is_file() and _stamp_matches(stamp, want):
        return target
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        archive = Cpio(out)
        archive.tree(root, skip=_trimmed)
        # Debian's /lib is a link to usr/lib: the modules go where it points.
        lib = f"usr/lib/modules/{kernel.release}"
        archive.directory("usr/lib/modules")
        archive.directory(lib)
        archive.tree(modules / "modules", prefix=f"{lib}/")
        archive.close()
    partial.rename(target)
    _write_atomic(stamp, json.dumps(want).encode())
    size = target.stat().st_size >> 20
    _say(log, f"base archive: {size} MiB in {time.monotonic() - started:.0f}s")
    return target


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: KernelPackage
    vmlinuz: Path
    base: Path


def build(log: TextIO = sys.stderr) -> Image:
    """Everything a boot needs, built where missing or out of date."""
    host_tools()
    with _locked():
        return _build(log)


def _build(log: TextIO) -> Image:
    started = time.monotonic()
    kernel = newest_kernel(log)
    kernel_dir = build_kernel(kernel, log)
    root = build_root(log)
    base = build_base(root, kernel, kernel_dir, log)
    _say(
        log,
        f"image ready in {time.monotonic() - started:.0f}s: "
        f"{kernel.package} {kernel.version}, {base}",
    )
    return Image(kernel, kernel_dir / "vmlinuz", base)


# -- one run --

# PID 1 of the guest; its console is the tree's /dev/console (ttyS0).
GUEST_INIT = """#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
for module in {modules}; do
    insmod /usr/lib/modules/$(uname -r)/$module
done
echo toktra-guest > /proc/sys/kernel/hostname
ip link set lo up
cd {source} && PYTHONPATH={source} python3 -m tests.kernels guest {deadline}
echo o > /proc/sysrq-trigger
sleep 60
"""

# The harness runs `.venv/bin/toktra-agent`; the guest has no venv, only
# Debian's python3 and its packages.
GUEST_AGENT = f"""#!/bin/sh
PYTHONPATH={GUEST_SOURCE} exec /usr/bin/python3 -m agent.cli "$@"
"""


def _checkout_skip(rel: str) -> bool:
    return "__pycache__" in rel.split("/") or rel.endswith(".pyc")


def write_run_archive(out: BinaryIO, accel: str) -> None:
    """The checkout, the object, the agent's command and /init."""
    archive = Cpio(out)
    archive.file(
        "init",
        GUEST_INIT.format(
            modules=" ".join(MODULES),
            source=GUEST_SOURCE,
            deadline=PYTEST_DEADLINE_S[accel],
        ).encode(),
        0o755,
    )
    src = GUEST_SOURCE.strip("/")
    archive.directory(src)
    for name in ("agent", "tests"):
        archive.path(ROOT / name, f"{src}/{name}")
        archive.tree(ROOT / name, prefix=f"{src}/{name}/", skip=_checkout_skip)
    for name in ("pyproject.toml", "setup.cfg"):
        archive.path(ROOT / name, f"{src}/{name}")
    archive.directory(f"{src}/build")
    archive.path(OBJECT, f"{src}/build/{OBJECT.name}")
    archive.directory(f"{src}/.venv")
    archive.directory(f"{src}/.venv/bin")
    archive.file(f"{src}/.venv/bin/toktra-agent", GUEST_AGENT.encode(), 0o755)
    archive.close()


def accelerator(vmlinuz: Path) -> tuple[str, list[str], str]:
    """(name, qemu arguments, why): KVM when a kernel really boots on it.

    /dev/kvm can exist and still refuse or hang a normal guest (a nested
    or paravirtual KVM), so the kernel is booted on it once with no root
    and must print its banner in time; otherwise qemu emulates (TCG).
    """
    # One host thread for both vCPUs: with a thread each (MTTCG), a vCPU
    # once kept running a stale translation of an int3 that another had
    # patched out of a jump label (the probes' attach and detach flip the
    # syscall tracepoints' static keys) and the guest locked up for good.
    # On this 2-core host a single thread is no slower.
    tcg = ["-accel", "tcg,thread=single", "-cpu", "max"]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", tcg, "no usable /dev/kvm"
    cmd = [
        QEMU, "-enable-kvm", "-cpu", "host", "-m", "256",
        "-kernel", str(vmlinuz),
        "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
        "-nographic", "-monitor", "none", "-nic", "none", "-no-reboot",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=KVM_PROBE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:  # subprocess.run killed it by pid
        return "tcg", tcg, f"a kernel printed nothing in {KVM_PROBE_S}s under KVM"
    if b"Linux version" in done.stdout:
        return "kvm", ["-enable-kvm", "-cpu", "host"], "a kernel boots under KVM"
    said = (done.stderr or done.stdout).decode(errors="replace").strip()
    return "tcg", tcg, f"KVM refused a kernel: {said.splitlines()[0] if said else ''}"


@dataclasses.dataclass
class Run:
    """One boot: what was booted, how, how long, and the guest's report."""

    kernel: KernelPackage
    accel: str
    accel_reason: str
    seconds: float
    report: dict[str, Any]
    console: Path


def run(log: TextIO = sys.stderr) -> Run:
    """Builds what is missing, boots the guest once, returns its report."""
    host_tools()
    if not OBJECT.is_file():
        raise BuildError(f"{OBJECT} is missing; build it with `make bpf`")
    runs = CACHE / "runs"
    console = CACHE / "console.log"
    with _locked():
        image = _build(log)
        runs.mkdir(exist_ok=True)
        _clear_stale_runs(runs)
        work = Path(tempfile.mkdtemp(dir=runs, prefix=f"{os.getpid()}-"))
        vmlinuz = work / "vmlinuz"
        initrd = work / "initrd.cpio"
        shutil.copyfile(image.vmlinuz, vmlinuz)
        shutil.copyfile(image.base, initrd)
    try:
        accel, accel_args, why = accelerator(vmlinuz)
        _say(log, f"accelerator {accel}: {why}")
        with open(initrd, "ab") as out:
            write_run_archive(out, accel)
        started = time.monotonic()
        report = boot(vmlinuz, initrd, accel, accel_args, work, log)
        seconds = time.monotonic() - started
        _say(log, f"guest ran for {seconds:.0f}s; console in {console}")
        return Run(image.kernel, accel, why, seconds, report, console)
    finally:
        # The last run's console stays, whatever became of the run.
        with contextlib.suppress(OSError):
            shutil.copyfile(work / "console.log", console)
        shutil.rmtree(work, ignore_errors=True)


def _clear_stale_runs(runs: Path) -> None:
    """Removes what runs killed before their cleanup left (pid-prefixed)."""
    for work in runs.iterdir():
        pid = int(work.name.split("-", 1)[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def boot(
    vmlinuz: Path,
    initrd: Path,
    accel: str,
    accel_args: list[str],
    work: Path,
    log: TextIO,
) -> dict[str, Any]:
    """Boots the guest and waits for it to power off; its report."""
    console, report = work / "console.log", work / "report.log"
    cmd = [
        QEMU, *accel_args,
        "-m", str(GUEST_MEMORY_MB), "-smp", str(GUEST_CPUS),
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        # Only what the boot needs: the kernel runs as Debian ships it, no
        # tuning (mitigations=off would save about 15% under emulation).
        "-append", "console=ttyS0 rdinit=/init panic=-1",
        "-nographic", "-monitor", "none",
        "-serial", f"file:{console}", "-serial", f"file:{report}",
        "-nic", "none", "-no-reboot",
    ]  # fmt: skip
    _say(log, "booting:", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S[accel])
    except subprocess.TimeoutExpired:
        proc.kill()  # the qemu started above, by its pid
        proc.wait()
        raise GuestError(
            f"the guest did not power off in {DEADLINE_S[accel]}s; "
            f"console tail:\n{_tail(console)}"
        ) from None
    if proc.returncode != 0:
        raise GuestError(
            f"qemu exited {proc.returncode}: {out.decode(errors='replace')[-1000:]}\n"
            f"console tail:\n{_tail(console)}"
        )
    try:
        return parse_report(report.read_text(errors="replace"))
    except ValueError as e:
        raise GuestError(f"{e}; console tail:\n{_tail(console)}") from None


def _tail(path: Path, size: int = 6000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-size:]
    return "(no console output)"


def parse_report(text: str) -> dict[str, Any]:
    """The JSON between the markers; the serial line may add carriage returns."""
    text = text.replace("\r", "")
    begin, end = text.find(REPORT_BEGIN), text.find(REPORT_END)
    if begin < 0 or end < begin:
        raise ValueError("the guest wrote no report")
    return json.loads(text[begin + len(REPORT_BEGIN) : end])


# -- inside the guest --


def _load_probe(send_hook: str) -> dict[str, Any]:
    """What the loader does with `send_hook` on this kernel."""
    from agent.collector import probes

    try:
        capture = probes.load([PROBE_PORT], send_hook=send_hook)
    except probes.ProbeError as e:
        return {"requested": send_hook, "error": str(e)}
    try:
        return {
            "requested": capture.requested,
            "send_hook": capture.send_hook,
            "fell_back": capture.fell_back,
            "refused": capture.refused,
            "object_path": capture.object_path,
            "object_sha256": sha256(capture.object_path),
            "libssl": len(capture.libraries),
        }
    finally:
        capture.close()


def _outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """node id -> outcome (and message) from pytest's xunit1 report."""
    tests: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("file") or ""
        # classname is the dotted module, then any test classes
        depth = len(Path(module).with_suffix("").parts)
        classes = (case.get("classname") or "").split(".")[depth:]
        nodeid = "::".join([module, *classes, case.get("name") or ""])
        result = {"outcome": "passed"}
        for tag, outcome in (
            ("skipped", "skipped"),
            ("failure", "failed"),
            ("error", "error"),
        ):
            found = case.find(tag)
            if found is not None:
                message = found.get("message") or ""
                result = {"outcome": outcome, "message": message[:2000]}
        tests[nodeid] = result
    return tests


def _pytest(deadline: float) -> dict[str, Any]:
    junit = Path("/tmp/junit.xml")
    cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--color=no",
        "-o", "junit_family=xunit1", f"--junitxml={junit}",
        *GUEST_SUITES,
        *(f"--deselect={nodeid}" for nodeid in DESELECTED),
    ]  # fmt: skip
    print("guest: running", " ".join(cmd), flush=True)
    started = time.monotonic()
    try:
        code = subprocess.run(cmd, timeout=deadline, check=False).returncode
    except subprocess.TimeoutExpired:
        code = None
    result: dict[str, Any] = {
        "exit_code": code,
        "seconds": round(time.monotonic() - started, 1),
        "deselected": DESELECTED,
        "tests": {},
    }
    if junit.exists():
        result["tests"] = _outcomes(junit)
    return result


def guest(deadline: float) -> int:
    """Runs in the guest: the checks, then the report on REPORT_PORT."""
    from agent.collector.kernel import Kernel

    kernel = Kernel()
    uname = os.uname()
    report: dict[str, Any] = {
        "release": uname.release,
        "version": uname.version,
        "object": {"path": str(OBJECT), "sha256": sha256(OBJECT)},
        "btf": os.path.exists(kernel.btf_path),
        "sock_send_length": kernel.has_tracepoint("sock", "sock_send_length"),
        # what /init's insmod left loaded: sock_diag must be there to test
        "modules": sorted(
            line.split()[0] for line in Path("/proc/modules").read_text().splitlines()
        ),
    }
    print(f"guest: {uname.release} {uname.version}", flush=True)
    report["auto"] = _load_probe("auto")
    # A variant this kernel cannot have, forced: it must be refused and
    # the loader must fall back to one that loads.
    report["forced"] = _load_probe("tracepoint")
    print("guest: auto", report["auto"], "forced", report["forced"], flush=True)
    report["pytest"] = _pytest(deadline)
    text = json.dumps(report, indent=1)
    with open(REPORT_PORT, "w") as port:
        port.write(f"{REPORT_BEGIN}\n{text}\n{REPORT_END}\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["guest"] and len(argv) == 2:
        return guest(float(argv[1]))
    if argv not in (["build"], ["run"]):
        print("usage: python -m tests.kernels build|run", file=sys.stderr)
        return 2
    try:
        if argv == ["build"]:
            build()
            return 0
        result = run()
    except Unavailable as e:
        print(f"kernels: qemu cannot run here: {e}", file=sys.stderr)
        return 1
    except (BuildError, GuestError) as e:
        print(f"kernels: {e}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
