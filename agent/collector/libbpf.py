"""A thin typed binding over libbpf.so.1, enough to run one CO-RE object.

Only what the collector needs: open an object, write its read-only data,
choose which programs load, load, attach, read the ring buffer and per-CPU
counters, and detach. libbpf's own log lines go to the `toktra.libbpf`
logger; the last of them are kept so a failed load can say why.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Callable, Collection, Iterator
from typing import ClassVar

log = logging.getLogger("toktra.libbpf")

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _c_char_p, _c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _c_void_p, _c_void_p, ctypes.c_size_t)


class BpfError(Exception):
    """A libbpf call failed; the message names the call and the cause."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class _UprobeOpts(ctypes.Structure):
    # struct bpf_uprobe_opts as of libbpf 1.1; libbpf accepts older and
    # newer layouts through the leading size field.
    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("ref_ctr_offset", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", _c_char_p),
    ]


class Libbpf:
    """The shared library with the prototypes this module uses."""

    def __init__(self, name: str = "libbpf.so.1") -> None:
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise BpfError(
                f"cannot load {name} ({e}); install libbpf 1.1 or later "
                "(Debian: apt-get install libbpf1)"
            ) from e
        self._libc = ctypes.CDLL(None)
        self._recent: collections.deque[str] = collections.deque(maxlen=400)
        self._declare()
        self._print_cb = _PRINT_FN(self._on_print)
        self.lib.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        L = self.lib
        sig = {
            "libbpf_set_print": (_c_void_p, [_PRINT_FN]),
            "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
            "bpf_object__load": (ctypes.c_int, [_c_void_p]),
            "bpf_object__close": (None, [_c_void_p]),
            "bpf_object__next_program": (_c_void_p, [_c_void_p, _c_void_p]),
            "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
            "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
            "bpf_object__next_map": (_c_void_p, [_c_void_p, _c_void_p]),
            "bpf_program__name": (_c_char_p, [_c_void_p]),
            "bpf_program__set_autoload": (ctypes.c_int, [_c_void_p, ctypes.c_bool]),
            "bpf_program__autoload": (ctypes.c_bool, [_c_void_p]),
            "bpf_program__attach": (_c_void_p, [_c_void_p]),
            "bpf_program__attach_uprobe_opts": (
                _c_void_p,
                [_c_void_p, ctypes.c_int, _c_char_p, ctypes.c_size_t, _c_void_p],
            ),
            "bpf_link__destroy": (ctypes.c_int, [_c_void_p]),
            "bpf_map__name": (_c_char_p, [_c_void_p]),
            "bpf_map__fd": (ctypes.c_int, [_c_void_p]),
            "bpf_map__initial_value": (
                _c_void_p,
                [_c_void_p, ctypes.POINTER(ctypes.c_size_t)],
            ),
            "bpf_map__set_initial_value": (
                ctypes.c_int,
                [_c_void_p, _c_void_p, ctypes.c_size_t],
            ),
            "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _c_void_p, _c_void_p]),
            "bpf_map_update_elem": (
                ctypes.c_int,
                [ctypes.c_int, _c_void_p, _c_void_p, ctypes.c_uint64],
            ),
            "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, _c_void_p]),
            "bpf_map_get_next_key": (
                ctypes.c_int,
                [ctypes.c_int, _c_void_p, _c_void_p],
            ),
            "libbpf_num_possible_cpus": (ctypes.c_int, []),
            "ring_buffer__new": (
                _c_void_p,
                [ctypes.c_int, _SAMPLE_FN, _c_void_p, _c_void_p],
            ),
            "ring_buffer__poll": (ctypes.c_int, [_c_void_p, ctypes.c_int]),
            "ring_buffer__consume": (ctypes.c_int, [_c_void_p]),
            "ring_buffer__free": (None, [_c_void_p]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(L, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self._libc.vsnprintf.restype = ctypes.c_int
        self._libc.vsnprintf.argtypes = [
            _c_char_p,
            ctypes.c_size_t,
            _c_char_p,
            _c_void_p,
        ]

    def _on_print(self, _level: int, fmt: bytes, args: int | None) -> int:
        buf = ctypes.create_string_buffer(65536)
        self._libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self._recent.append(line.strip())
        # Failures reach the operator through BpfError, summarized; the
        # full text (verifier dumps included) is for debugging only.
        if text.strip():
            log.debug("%s", text.rstrip())
        return 0

    def recent_log(self) -> str:
        """What libbpf said about the last failure, in a line or two.

        A refused program is followed by the verifier's dump; its last
        instruction-free line before the "processed N insns" summary is
        the reason.
        """
        lines = list(self._recent)
        picked = []
        for i, line in enumerate(lines):
            if line.startswith("processed ") and i > 0:
                picked.append("verifier: " + lines[i - 1])
        picked += [ln for ln in lines if ln.startswith("libbpf:") and "fail" in ln]
        if not picked:
            picked = lines[-2:]
        return " | ".join(dict.fromkeys(picked[-3:]))

    def clear_log(self) -> None:
        self._recent.clear()

    def check_ptr(self, ptr: int | None, what: str) -> int:
        if not ptr:
            err = ctypes.get_errno()
            raise BpfError(f"{what}: {os.strerror(err)}", err)
        return ptr

    def num_possible_cpus(self) -> int:
        n = self.lib.libbpf_num_possible_cpus()
        if n <= 0:
            raise BpfError(f"libbpf_num_possible_cpus: {os.strerror(-n)}", -n)
        return n


class Link:
    """An attachment; destroying it detaches the program."""

    def __init__(self, bpf: Libbpf, ptr: int, what: str) -> None:
        self._bpf = bpf
        self._ptr: int | None = ptr
        self.what = what
        self.program = what.split(":", 1)[0]

    def destroy(self) -> None:
        if self._ptr:
            self._bpf.lib.bpf_link__destroy(self._ptr)
            self._ptr = None


class RingBuffer:
    """Reads records from a BPF ring buffer map into a Python callback.

    The callback gets a bytes copy of each record. An exception raised by
    it stops the current drain and is re-raised from poll() or consume(),
    instead of vanishing inside the C callback.
    """

    def __init__(self, bpf: Libbpf, map_fd: int, handler: Callable[[bytes], None]):
        self._bpf = bpf
        self._handler = handler
        self._failure: BaseException | None = None
        self._cb = _SAMPLE_FN(self._on_sample)
        ptr = bpf.lib.ring_buffer__new(map_fd, self._cb, None, None)
        self._ptr: int | None = bpf.check_ptr(ptr, "ring_buffer__new")

    def _on_sample(self, _ctx: int | None, data: int, size: int) -> int:
        try:
            self._handler(ctypes.string_at(data, size))
        except BaseException as e:
            self._failure = e
            return -1
        return 0

    def _result(self, rc: int, call: str) -> int:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if rc < 0 and rc != -errno.EINTR:
            raise BpfError(f"{call}: {os.strerror(-rc)}", -rc)
        return max(rc, 0)

    def poll(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms for a wake-up, then drains woken rings."""
        rc = self._bpf.lib.ring_buffer__poll(self._ptr, timeout_ms)
        return self._result(rc, "ring_buffer__poll")

    def consume(self) -> int:
        """Drains every record present now, woken or not."""
        rc = self._bpf.lib.ring_buffer__consume(self._ptr)
        return self._result(rc, "ring_buffer__consume")

    def free(self) -> None:
        if self._ptr:
            self._bpf.lib.ring_buffer__free(self._ptr)
            self._ptr = None


class BpfObject:
    """One opened BPF object file, from open to close."""

    def __init__(self, bpf: Libbpf, path: str) -> None:
        self._bpf = bpf
        self.path = path
        bpf.clear_log()
        ptr = bpf.lib.bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            err = ctypes.get_errno()
            raise BpfError(
                f"cannot open BPF object {path}: {os.strerror(err)}; "
                f"{bpf.recent_log()}",
                err,
            )
        self._ptr: int | None = ptr
        self._links: list[Link] = []

    # -- before load --

    def programs(self) -> Iterator[tuple[str, int]]:
        prog = self._bpf.lib.bpf_object__next_program(self._ptr, None)
        while prog:
            yield self._bpf.lib.bpf_program__name(prog).decode(), prog
            prog = self._bpf.lib.bpf_object__next_program(self._ptr, prog)

    def _program(self, name: str) -> int:
        prog = self._bpf.lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not prog:
            raise BpfError(f"{self.path} has no program named {name!r}")
        return prog

    def set_autoload(self, name: str, autoload: bool) -> None:
        rc = self._bpf.lib.bpf_program__set_autoload(self._program(name), autoload)
        if rc:
            raise BpfError(f"bpf_program__set_autoload({name}): {os.strerror(-rc)}")

    def _map(self, name: str) -> int:
        m = self._bpf.lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if m:
            return m
        # Data section maps carry the object's name as a prefix
        # ("toktra_s.rodata"); match on the suffix.
        m = self._bpf.lib.bpf_object__next_map(self._ptr, None)
        while m:
            if self._bpf.lib.bpf_map__name(m).decode().endswith(name):
                return m
            m = self._bpf.lib.bpf_object__next_map(self._ptr, m)
        raise BpfError(f"{self.path} has no map named {name!r}")

    def set_rodata(self, data: bytes) -> None:
        """Replaces the whole .rodata section; sizes must agree exactly."""
        m = self._map(".rodata")
        size = ctypes.c_size_t(0)
        if not self._bpf.lib.bpf_map__initial_value(m, ctypes.byref(size)):
            raise BpfError(f"{self.path}: .rodata has no initial value")
        if size.value != len(data):
            raise BpfError(
                f"{self.path}: .rodata is {size.value} bytes but the loader "
                f"writes {len(data)}; the object and the agent do not match"
            )
        buf = ctypes.create_string_buffer(data, len(data))
        rc = self._bpf.lib.bpf_map__set_initial_value(m, buf, len(data))
        if rc:
            raise BpfError(f"bpf_map__set_initial_value: {os.strerror(-rc)}")

    def load(self) -> None:
        self._bpf.clear_log()
        rc = self._bpf.lib.bpf_object__load(self._ptr)
        if rc:
            raise BpfError(
                f"loading {self.path} failed: {os.strerror(-rc)}; "
                f"libbpf said: {self._bpf.recent_log()}",
                -rc,
            )

    # -- after load --

    def attach(self, name: str) -> Link:
        """Attaches a program where its section name says (tracepoints)."""
        self._bpf.clear_log()
        ptr = self._bpf.lib.bpf_program__attach(self._program(name))
        if not ptr:
            err = ctypes.get_errno()
            raise BpfError(
                f"attaching {name}: {os.strerror(err)}; {self._bpf.recent_log()}",
                err,
            )
        link = Link(self._bpf, ptr, name)
        self._links.append(link)
        return link

    def attach_uprobe(
        self, name: str, binary: str, func: str, retprobe: bool = False
    ) -> Link:
        """Attaches to func in binary for every process that maps it."""
        opts = _UprobeOpts(
            sz=ctypes.sizeof(_UprobeOpts),
            retprobe=retprobe,
            func_name=func.encode(),
        )
        self._bpf.clear_log()
        ptr = self._bpf.lib.bpf_program__attach_uprobe_opts(
            self._program(name), -1, os.fsencode(binary), 0, ctypes.byref(opts)
        )
        if not ptr:
            err = ctypes.get_errno()
            raise BpfError(
                f"uprobe {func} in {binary}: {os.strerror(err)}; "
                f"{self._bpf.recent_log()}",
                err,
            )
        link = Link(self._bpf, ptr, f"{name}:{binary}:{func}")
        self._links.append(link)
        return link

    def map_fd(self, name: str) -> int:
        fd = self._bpf.lib.bpf_map__fd(self._map(name))
        if fd < 0:
            raise BpfError(f"map {name} has no fd: {os.strerror(-fd)}")
        return fd

    def ring_buffer(self, name: str, handler: Callable[[bytes], None]) -> RingBuffer:
        return RingBuffer(self._bpf, self.map_fd(name), handler)

    def read_percpu_u64(self, name: str, count: int) -> list[int]:
        """Sums each index of a per-CPU array of u64 over all CPUs."""
        fd = self.map_fd(name)
        ncpu = self._bpf.num_possible_cpus()
        values = (ctypes.c_uint64 * ncpu)()
        totals = []
        for i in range(count):
            key = ctypes.c_uint32(i)
            rc = self._bpf.lib.bpf_map_lookup_elem(
                fd, ctypes.byref(key), ctypes.byref(values)
            )
            if rc:
                err = ctypes.get_errno()
                raise BpfError(f"reading {name}[{i}]: {os.strerror(err)}", err)
            totals.append(sum(values))
        return totals

    def lookup_u64(self, name: str, key: int, size: int) -> bytes | None:
        """The value under a u64 key of a hash map, or None when absent."""
        value = ctypes.create_string_buffer(size)
        k = ctypes.c_uint64(key)
        fd = self.map_fd(name)
        if self._bpf.lib.bpf_map_lookup_elem(fd, ctypes.byref(k), value):
            return None
        return value.raw

    def update(self, name: str, key: bytes, value: bytes) -> None:
        """Sets key to value in a hash map (keys and values as raw bytes)."""
        fd = self.map_fd(name)
        if self._bpf.lib.bpf_map_update_elem(fd, key, value, 0):
            err = ctypes.get_errno()
            raise BpfError(f"updating {name}: {os.strerror(err)}", err)

    def delete(self, name: str, key: bytes) -> bool:
        """Removes key from a hash map; False when it was not there."""
        return self._bpf.lib.bpf_map_delete_elem(self.map_fd(name), key) == 0

    def count_u64_keys(self, name: str, limit: int) -> int:
        """Entries of a hash map keyed by u64, walking at most `limit` keys.

        Keys removed during the walk can restart it from the beginning, so
        the count is a snapshot's, good for a gauge and no more.
        """
        fd = self.map_fd(name)
        key = ctypes.c_uint64(0)
        count = 0
        previous = None
        while count < limit:
            rc = self._bpf.lib.bpf_map_get_next_key(fd, previous, ctypes.byref(key))
            if rc:
                break  # ENOENT: the last key
            count += 1
            previous = ctypes.byref(ctypes.c_uint64(key.value))
        return count

    def detach(self, programs: Collection[str] | None = None) -> None:
        """Detaches every program, or only those named."""
        keep = []
        for link in reversed(self._links):
            if programs is None or link.program in programs:
                link.destroy()
            else:
                keep.append(link)
        self._links = keep[::-1]

    def close(self) -> None:
        """Detaches everything and frees the object; safe to call twice."""
        self.detach()
        if self._ptr:
            self._bpf.lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
