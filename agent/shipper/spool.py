"""The shipper's durable spool: events are on disk before they are sent.

In: events as they arrive, appended to the batch being filled. Out: sealed
batches, oldest first, each removed only once the destination took it.

Layout of the spool directory:

    open.jsonl              the batch being filled, one event per line
    b{seq:016d}-{n}.jsonl   sealed batches; seq orders them, n counts events
    rejected/               batches the destination refused for good
    corrupt/                batch files that held unreadable lines

Arriving events are appended to `open.jsonl` with one write per burst, which a
killed process cannot tear; sealing fsyncs it and renames it into place, so a
sealed batch is complete or absent. At start the spool is read back: a
leftover `open.jsonl` is sealed, temporary files are removed, and files that
do not belong are moved to `corrupt/`.

Policies, each counted by reason in `dropped` and logged once per episode:

- full (`max_bytes`): the oldest sealed batches are deleted to make room;
- unreadable lines in a batch: the readable events are sent, the file is kept
  in `corrupt/` for inspection, and the lines counted;
- disk not writable (full, read-only, I/O error), or a write that would
  leave less than `RESERVE_BYTES` (at most 5% of the file system) free for
  the device key and certificate: batches are held in memory, up to
  `MAX_MEMORY_EVENTS`, oldest dropped first, until writing works again.

`rejected/` and `corrupt/` keep the newest `KEEP_ASIDE` files each; they are
evidence for an operator, not a queue, and they count against no budget.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from agent.runtime import Episode

log = logging.getLogger("toktra.shipper")

OPEN_NAME = "open.jsonl"
BATCH_NAME = re.compile(r"b(?P<seq>[0-9]{16})-(?P<count>[0-9]+)\.jsonl")
KEEP_ASIDE = 100
MAX_BATCH_EVENTS = 10_000  # the largest batch_max_events allowed
# Room left on the file system for the device key and certificate, which
# live beside the spool: at most this much, at most 5% of the file system.
RESERVE_BYTES = 4 * 1024 * 1024
MAX_MEMORY_EVENTS = 100_000
CACHE_EVENTS = 5_000  # events of sealed batches on disk also kept in memory


@dataclass
class Batch:
    """One sealed batch: a file in the spool, or events held in memory."""

    seq: int
    count: int
    path: str | None  # None when the disk could not take it
    size: int = 0
    events: list[dict] | None = None  # cached, or the only copy when path is None
    cached: int = 0  # events counted against CACHE_EVENTS
    unreadable: int = 0  # lines of the file that did not parse


@dataclass
class SpoolStats:
    dropped: dict[str, int] = field(
        default_factory=lambda: {"spool_full": 0, "unreadable": 0, "memory_full": 0}
    )
    rejected: int = 0
    write_errors: int = 0
    recovered: int = 0  # events found on disk at start


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(events: list[dict]) -> bytes:
    return b"".join(
        json.dumps(e, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        for e in events
    )


def _parse(data: bytes) -> tuple[list[dict], int]:
    """Events from JSON lines, and how many non-empty lines were unreadable."""
    events: list[dict] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            bad += 1
    return events, bad


class Spool:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.stats = SpoolStats()
        self.queue: collections.deque[Batch] = collections.deque()
        self._next_seq = 1
        self._open_fd: int | None = None
        self._open_size = 0
        self._open_count = 0
        self._open_failed = False
        self._sealed_bytes = 0
        self._cached = 0  # events of batches on disk held in memory too
        self._write_trouble = Episode(
            log, "spool not writable, holding batches in memory", "spool writable again"
        )
        self._full = Episode(
            log, "spool full, dropping the oldest batches", "spool has room again"
        )

    # --- start-up -----------------------------------------------------------

    def open(self) -> None:
        """Creates the layout and reads back what an earlier run left."""
        for sub in ("", "rejected", "corrupt"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o750, exist_ok=True)
        found: list[Batch] = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name in ("rejected", "corrupt", OPEN_NAME) or not os.path.isfile(path):
                continue
            if name.endswith(".tmp"):
                os.unlink(path)  # a seal that never finished; open.jsonl holds it
                continue
            match = BATCH_NAME.fullmatch(name)
            if match is not None and int(match["count"]) > MAX_BATCH_EVENTS:
                match = None  # no batch of ours is that large
            if match is None:
                log.warning("spool: %s does not belong here; moved to corrupt/", name)
                self._set_aside(path, "corrupt")
                continue
            size = os.path.getsize(path)
            found.append(Batch(int(match["seq"]), int(match["count"]), path, size=size))
        found.sort(key=lambda b: b.seq)
        self.queue.extend(found)
        self._sealed_bytes = sum(b.size for b in found)
        # Sequence numbers start from the clock (microseconds), so names in
        # rejected/ and corrupt/ stay unique across runs with an empty spool.
        self._next_seq = max(time.time_ns() // 1000, found[-1].seq + 1 if found else 0)
        self._recover_open()
        self.stats.recovered = self.buffered_events()
        if self.queue:
            log.info(
                "spool: %d batches (%d events, %d bytes) left by an earlier run",
                len(self.queue),
                self.stats.recovered,
                self._sealed_bytes,
            )

    def _recover_open(self) -> None:
        path = os.path.join(self.dir, OPEN_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        events, bad = _parse(data)
        if not events:
            if bad:
                self._count_unreadable(bad, OPEN_NAME)
                self._set_aside(path, "corrupt")
            else:
                os.unlink(path)
            return
        batch = Batch(self._take_seq(), len(events), None, size=len(data))
        batch.path = os.path.join(self.dir, self._name(batch))
        os.rename(path, batch.path)
        _fsync_dir(self.dir)
        self.queue.append(batch)
        self._sealed_bytes += batch.size

    # --- filling the open batch --------------------------------------------

    def append(self, events: list[dict]) -> None:
        """Writes arriving events to the open batch (one write for all)."""
        self._open_count += len(events)
        if self._open_failed:
            return  # this batch goes to memory or is rewritten whole at seal
        data = _encode(events)
        self._make_room(self._open_size + len(data))
        try:
            self._check_free(len(data))
            if self._open_fd is None:
                self._open_fd = os.open(
                    os.path.join(self.dir, OPEN_NAME),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                    0o640,
                )
            written = os.write(self._open_fd, data)
            if written != len(data):
                raise OSError(28, f"short write, {written} of {len(data)} bytes")
        except OSError as err:
            self._write_failed(err)
            self._open_failed = True
            return
        self._open_size += written

    def seal(self, events: list[dict]) -> Batch:
        """Closes the open batch; `events` is its content, kept by the caller."""
        batch = Batch(self._take_seq(), len(events), None)
        if not self._open_failed and self._open_fd is not None:
            batch.path = self._seal_open(batch)
        elif events:
            batch.path = self._write_whole(batch, events)
        self._reset_open()
        if batch.path is None:
            batch.events = events
            self._hold_in_memory(batch)
        else:
            self._write_trouble.over()
            batch.size = os.path.getsize(batch.path)
            self._sealed_bytes += batch.size
            # Keep the events of the next batches to go out in memory, so
            # a backlog is not read back and parsed again; bounded.
            if not self.queue or self._cached + len(events) <= CACHE_EVENTS:
                batch.events = events
                batch.cached = len(events)
                self._cached += batch.cached
        self.queue.append(batch)
        return batch

    def _seal_open(self, batch: Batch) -> str | None:
        assert self._open_fd is not None
        path = os.path.join(self.dir, self._name(batch))
        try:
            os.fsync(self._open_fd)
            os.rename(os.path.join(self.dir, OPEN_NAME), path)
            _fsync_dir(self.dir)
        except OSError as err:
            self._write_failed(err)
            return None
        return path

    def _write_whole(self, batch: Batch, events: list[dict]) -> str | None:
        data = _encode(events)
        self._make_room(len(data))
        path = os.path.join(self.dir, self._name(batch))
        tmp = path + ".tmp"
        try:
            self._check_free(len(data))
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o640)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(self.dir)
        except OSError as err:
            self._write_failed(err)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        return path

    def _reset_open(self) -> None:
        if self._open_fd is not None:
            os.close(self._open_fd)
            self._open_fd = None
        if self._open_failed:
            # What the failed journal holds is in memory or rewritten whole.
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, OPEN_NAME))
        self._open_size = self._open_count = 0
        self._open_failed = False

    # --- the queue -------------------------------------------------------------

    def head(self) -> Batch | None:
        return self.queue[0] if self.queue else None

    def load(self, batch: Batch) -> list[dict]:
        """The batch's events, read from disk unless cached."""
        if batch.events is not None:
            return batch.events
        assert batch.path is not None
        try:
            with open(batch.path, "rb") as f:
                data = f.read()
        except OSError as err:
            log.error("spool: cannot read %s: %s", batch.path, err)
            batch.unreadable = batch.count
            self._count_unreadable(batch.count, os.path.basename(batch.path))
            batch.events = []
            return batch.events
        events, bad = _parse(data)
        if bad:
            batch.unreadable = bad
            self._count_unreadable(bad, os.path.basename(batch.path))
        batch.events = events
        return events

    def done(self, batch: Batch) -> None:
        """The destination took the batch: forget it."""
        self._remove(batch)
        if batch.path is None:
            return
        if batch.unreadable:
            self._set_aside(batch.path, "corrupt")
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(batch.path)

    def reject(self, batch: Batch) -> None:
        """The destination refused the batch for good: keep it aside."""
        self._remove(batch)
        self.stats.rejected += batch.count
        if batch.path is not None:
            self._set_aside(batch.path, "rejected")

    def buffered_events(self) -> int:
        return sum(b.count for b in self.queue) + self._open_count

    def bytes_used(self) -> int:
        return self._sealed_bytes + self._open_size

    def close(self) -> None:
        """Leaves the open batch on disk; the next start seals it."""
        if self._open_fd is not None:
            try:
                os.fsync(self._open_fd)
            except OSError as err:
                log.error("spool: fsync of the open batch failed: %s", err)
            os.close(self._open_fd)
            self._open_fd = None

    # --- bookkeeping -------------------------------------------------------

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    @staticmethod
    def _name(batch: Batch) -> str:
        return f"b{batch.seq:016d}-{batch.count}.jsonl"

    def _remove(self, batch: Batch) -> None:
        self.queue.remove(batch)
        if batch.path is not None:
            self._sealed_bytes -= batch.size
        self._cached -= batch.cached
        batch.cached = 0
        batch.events = None

    def _make_room(self, incoming: int) -> None:
        """Deletes the oldest sealed batches until `incoming` more bytes fit."""
        dropped = False
        while self._sealed_bytes + incoming > self.max_bytes:
            oldest = next((b for b in self.queue if b.path is not None), None)
            if oldest is None:
                break  # one batch larger than the whole budget: keep it
            self._remove(oldest)
            assert oldest.path is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(oldest.path)
            self.stats.dropped["spool_full"] += oldest.count
            dropped = True
            self._full.happened(
                f"over spool_max_bytes={self.max_bytes}; "
                f"deleted batch {oldest.seq} ({oldest.count} events)"
            )
        if not dropped:
            self._full.over()

    def _hold_in_memory(self, batch: Batch) -> None:
        held = sum(b.count for b in self.queue if b.path is None) + batch.count
        while held > MAX_MEMORY_EVENTS:
            oldest = next(b for b in self.queue if b.path is None)
            self._remove(oldest)
            held -= oldest.count
            self.stats.dropped["memory_full"] += oldest.count
            log.error(
                "spool: more than %d events held in memory; dropped batch %d "
                "(%d events)",
                MAX_MEMORY_EVENTS,
                oldest.seq,
                oldest.count,
            )

    def _check_free(self, incoming: int) -> None:
        """Refuses a write that would eat the space kept for the identity."""
        fs = os.statvfs(self.dir)
        reserve = min(RESERVE_BYTES, fs.f_blocks * fs.f_frsize // 20)
        if fs.f_bavail * fs.f_frsize - incoming < reserve:
            raise OSError(
                errno.ENOSPC,
                f"less than {reserve} bytes would be left free for the device key "
                "and certificate",
            )

    def _write_failed(self, err: OSError) -> None:
        self.stats.write_errors += 1
        self._write_trouble.happened(f"{self.dir}: {err.strerror or err}")

    def _count_unreadable(self, lines: int, name: str) -> None:
        self.stats.dropped["unreadable"] += lines
        log.error("spool: %d unreadable lines in %s; kept in corrupt/", lines, name)

    def _set_aside(self, path: str, where: str) -> None:
        aside = os.path.join(self.dir, where)
        try:
            os.rename(path, os.path.join(aside, os.path.basename(path)))
            kept = sorted(os.listdir(aside))
            for name in kept[: max(0, len(kept) - KEEP_ASIDE)]:
                os.unlink(os.path.join(aside, name))
        except OSError as err:
            log.error("spool: cannot move %s to %s/: %s", path, where, err)
            with contextlib.suppress(OSError):
                os.unlink(path)
