"""The durable spool on real files: sealing, recovery, corruption, full disks."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from agent.shipper import spool as spool_module
from agent.shipper.spool import BATCH_NAME, OPEN_NAME, Spool
from tests.conftest import fill


def events(start: int, count: int) -> list[dict]:
    return [
        {"event_id": f"e{i:06d}", "pad": "x" * 200} for i in range(start, start + count)
    ]


def ids(batch_events: list[dict]) -> list[str]:
    return [e["event_id"] for e in batch_events]


def drain(spool: Spool) -> list[str]:
    """Everything queued, oldest first, each batch marked done."""
    seen: list[str] = []
    while (head := spool.head()) is not None:
        seen += ids(spool.load(head))
        spool.done(head)
    return seen


def sealed_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if BATCH_NAME.fullmatch(p.name))


def test_seal_then_done_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    spool.append(events(0, 3))
    spool.append(events(3, 2))
    assert spool.buffered_events() == 5
    batch = spool.seal(events(0, 5))
    assert batch.count == 5 and batch.path is not None
    assert os.path.basename(batch.path).endswith("-5.jsonl")
    assert stat.S_IMODE(os.stat(batch.path).st_mode) == 0o640
    assert not (tmp_path / OPEN_NAME).exists()
    assert ids(spool.load(batch)) == ids(events(0, 5))
    spool.done(batch)
    assert sealed_files(tmp_path) == [] and spool.buffered_events() == 0
    assert spool.bytes_used() == 0


def test_a_backlog_is_served_from_memory_up_to_the_cache_bound(
    tmp_path: Path, monkeypatch
) -> None:
    """Sealed batches stay readable from memory while the cache has room;
    past it they are read back from their files (deleted here to tell)."""
    monkeypatch.setattr(spool_module, "CACHE_EVENTS", 25)
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    sealed = []
    for n in range(5):
        spool.append(events(n * 10, 10))
        sealed.append(spool.seal(events(n * 10, 10)))
    cached = [b.events is not None for b in sealed]
    # The first batch is next to go out; two more fit in 25 events.
    assert cached == [True, True, False, False, False]
    for batch in sealed:
        assert batch.path is not None
        os.unlink(batch.path)
    assert ids(spool.load(sealed[1])) == ids(events(10, 10))
    # Beyond the bound the file is the only copy: gone, so unreadable.
    assert spool.load(sealed[2]) == []
    # Sending frees the cache for the batches sealed after.
    spool.done(sealed[0])
    spool.done(sealed[1])
    spool.append(events(50, 10))
    assert spool.seal(events(50, 10)).events is not None


def test_a_killed_process_loses_nothing_it_appended(tmp_path: Path) -> None:
    # Nothing is buffered in the process: what append() returned from is in
    # the kernel's page cache, which survives SIGKILL. A second Spool on the
    # same directory without close() is what the next start sees.
    first = Spool(str(tmp_path), 1 << 20)
    first.open()
    first.append(events(0, 4))
    first.seal(events(0, 4))
    first.append(events(4, 3))  # the open batch
    second = Spool(str(tmp_path), 1 << 20)
    second.open()
    assert second.stats.recovered == 7
    assert drain(second) == ids(events(0, 7))


def test_recovery_keeps_order_and_new_batches_follow(tmp_path: Path) -> None:
    first = Spool(str(tmp_path), 1 << 20)
    first.open()
    for start in (0, 10, 20):
        first.append(events(start, 10))
        first.seal(events(start, 10))
    first.close()
    second = Spool(str(tmp_path), 1 << 20)
    second.open()
    second.append(events(30, 5))
    second.seal(events(30, 5))
    assert drain(second) == ids(events(0, 35))


def test_torn_last_line_of_open_batch_is_counted(tmp_path: Path) -> None:
    # A power cut can leave half a line at the end of the open batch.
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    spool.append(events(0, 3))
    spool.close()
    with open(tmp_path / OPEN_NAME, "ab") as f:
        f.write(b'{"event_id": "e0000')
    again = Spool(str(tmp_path), 1 << 20)
    again.open()
    assert drain(again) == ids(events(0, 3))
    assert again.stats.dropped["unreadable"] == 1


def test_corrupt_batch_sends_what_it_can_and_is_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    for start in (0, 5):
        spool.append(events(start, 5))
        spool.seal(events(start, 5))
    spool.close()
    first = tmp_path / sealed_files(tmp_path)[0]
    lines = first.read_bytes().split(b"\n")
    lines[2] = b"\x00\xff garbage \x00"
    first.write_bytes(b"\n".join(lines))
    (tmp_path / "notes.txt").write_text("not a batch")
    (tmp_path / "b0000000000000001-3.jsonl.tmp").write_text("half")

    again = Spool(str(tmp_path), 1 << 20)
    caplog.set_level(logging.WARNING, "toktra.shipper")
    again.open()
    assert not (tmp_path / "b0000000000000001-3.jsonl.tmp").exists()
    assert (tmp_path / "corrupt" / "notes.txt").exists()
    got = drain(again)
    assert got == [i for n, i in enumerate(ids(events(0, 10))) if n != 2]
    assert again.stats.dropped["unreadable"] == 1
    assert (tmp_path / "corrupt" / first.name).exists()
    assert "unreadable lines" in caplog.text
    assert "garbage" not in caplog.text  # contents never reach the log


def test_full_spool_drops_oldest_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "toktra.shipper")
    one_batch = len(spool_module._encode(events(0, 10)))
    spool = Spool(str(tmp_path), 3 * one_batch)
    spool.open()
    for start in range(0, 60, 10):
        spool.append(events(start, 10))
        spool.seal(events(start, 10))
    assert spool.bytes_used() <= 3 * one_batch
    assert spool.stats.dropped["spool_full"] == 30
    assert drain(spool) == ids(events(30, 30))
    assert caplog.text.count("spool full") == 1


def test_reject_keeps_the_newest_files_aside(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spool_module, "KEEP_ASIDE", 2)
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    for start in range(0, 40, 10):
        spool.append(events(start, 10))
        spool.seal(events(start, 10))
    names = sealed_files(tmp_path)
    while (head := spool.head()) is not None:
        spool.reject(head)
    assert spool.stats.rejected == 40
    assert sorted(os.listdir(tmp_path / "rejected")) == names[-2:]


def test_full_disk_holds_batches_in_memory_and_loses_nothing(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "toktra.shipper")
    spool = Spool(str(tiny_fs / "spool"), 1 << 20)
    spool.open()
    filler = tiny_fs / "filler"
    fill(filler)
    for start in range(0, 30, 10):  # none of these fit
        spool.append(events(start, 10))
        spool.seal(events(start, 10))
    assert [b.path for b in spool.queue] == [None, None, None]
    assert spool.stats.write_errors >= 3
    assert caplog.text.count("spool not writable") == 1
    assert not (tiny_fs / "spool" / OPEN_NAME).exists()

    filler.unlink()  # space again
    spool.append(events(30, 10))
    spool.seal(events(30, 10))
    assert spool.queue[-1].path is not None
    assert "spool writable again (" in caplog.text
    assert drain(spool) == ids(events(0, 40))
    assert spool.stats.dropped == {"spool_full": 0, "unreadable": 0, "memory_full": 0}


def test_disk_filling_mid_batch_rewrites_the_batch_whole(tiny_fs: Path) -> None:
    spool = Spool(str(tiny_fs / "spool"), 1 << 20)
    spool.open()
    spool.append(events(0, 5))
    filler = tiny_fs / "filler"
    fill(filler)
    spool.append(events(5, 40))  # fails part-way or at once
    filler.unlink()
    spool.seal(events(0, 45))
    batch = spool.queue[-1]
    assert batch.path is not None and batch.count == 45
    batch.events = None  # force a read from disk
    assert ids(spool.load(batch)) == ids(events(0, 45))
