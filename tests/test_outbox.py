"""The outbox on its own: file format, recovery, cursor, orphans, truncation, memory bound."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from schemas.errors import OutboxError
from supervisor.eventlog.outbox import Outbox, Record


def _fill(outbox: Outbox, n: int, *, prefix: str = "e") -> list[int]:
    return [
        outbox.append(f"sup.task.x.n1.t{i}", f"{prefix}-{i}", f"payload-{i}".encode())
        for i in range(n)
    ]


def _ids(records: list[Record]) -> list[str]:
    return [r.msg_id for r in records]


def test_append_returns_consecutive_seqs_and_pending_reads_them_back(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        seqs = _fill(outbox, 3)

        records = outbox.pending(10)

        assert seqs == [1, 2, 3]
        assert records == [
            Record(1, "sup.task.x.n1.t0", "e-0", b"payload-0"),
            Record(2, "sup.task.x.n1.t1", "e-1", b"payload-1"),
            Record(3, "sup.task.x.n1.t2", "e-2", b"payload-2"),
        ]
        assert outbox.backlog == 3


def test_pending_honours_limit_and_after(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 5)

        assert [r.seq for r in outbox.pending(2)] == [1, 2]
        assert [r.seq for r in outbox.pending(2, after=2)] == [3, 4]
        assert [r.seq for r in outbox.pending(2, after=4)] == [5]
        assert outbox.pending(2, after=5) == []


def test_ack_advances_the_cursor_and_persists_it(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 5)

        outbox.ack(3)

        assert [r.seq for r in outbox.pending(10)] == [4, 5]
        assert outbox.backlog == 2
        assert (tmp_dir / "a.cursor").read_text() == "3\n"


def test_ack_beyond_the_last_record_is_refused(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 2)
        outbox.pending(10)

        with pytest.raises(ValueError, match="beyond the last record 2"):
            outbox.ack(3)


def test_reopen_resumes_after_the_cursor(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 5)
        outbox.pending(10)
        outbox.ack(3)

    with Outbox(tmp_dir, "a") as reopened:
        assert _ids(reopened.pending(10)) == ["e-3", "e-4"]
        assert reopened.backlog == 2
        assert reopened.append("sup.task.x.n1.t9", "e-9", b"p") == 6


def test_the_log_is_locked_for_the_owner(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a"), pytest.raises(OutboxError, match="held by another process"):
        Outbox(tmp_dir, "a")


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x10\x00", id="half-a-header"),
        pytest.param(struct.pack("<II", 50, 0) + b"short", id="body-cut-short"),
        pytest.param(struct.pack("<II", 2**31, 0), id="absurd-length"),
        pytest.param(struct.pack("<II", 3, 12345) + b"abc", id="bad-crc"),
    ],
)
def test_a_torn_last_record_is_dropped_on_open(tmp_dir: Path, tail: bytes) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 3)
    log = tmp_dir / "a.log"
    intact = log.stat().st_size
    with log.open("ab") as f:
        f.write(tail)

    with Outbox(tmp_dir, "a") as reopened:
        assert _ids(reopened.pending(10)) == ["e-0", "e-1", "e-2"]
        assert log.stat().st_size == intact
        assert reopened.append("sup.task.x.n1.t3", "e-3", b"p") == 4

    with Outbox(tmp_dir, "a") as again:
        assert _ids(again.pending(10)) == ["e-0", "e-1", "e-2", "e-3"]


def test_a_record_with_a_flipped_byte_ends_the_log(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 3)
    log = tmp_dir / "a.log"
    data = bytearray(log.read_bytes())
    data[-2] ^= 0xFF  # inside the last record's payload
    log.write_bytes(bytes(data))

    with Outbox(tmp_dir, "a") as reopened:
        assert _ids(reopened.pending(10)) == ["e-0", "e-1"]


@pytest.mark.parametrize("where", ["header", "body"])
def test_a_damaged_record_in_the_middle_is_set_aside_and_the_rest_kept(
    tmp_dir: Path, where: str
) -> None:
    """Four bytes flipped in record 3 of 40: the other 39 survive, in order, and the
    damaged bytes are kept in a quarantine file."""
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 40)
    log = tmp_dir / "a.log"
    data = bytearray(log.read_bytes())
    starts = [0]
    while starts[-1] < len(data):
        starts.append(starts[-1] + 8 + struct.unpack_from("<I", data, starts[-1])[0])
    third, fourth = starts[2], starts[3]
    at = third + 1 if where == "header" else fourth - 6
    original = bytes(data[third:fourth])
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    log.write_bytes(bytes(data))

    with Outbox(tmp_dir, "a") as reopened:
        kept = _ids(reopened.pending(100))
        more = _fill(reopened, 1, prefix="after")

    assert kept == [f"e-{i}" for i in range(40) if i != 2]
    assert more == [41]
    quarantined = list(tmp_dir.glob("a.quarantine-*"))
    assert [q.name for q in quarantined] == [f"a.quarantine-{third}"]
    assert quarantined[0].read_bytes() == bytes(data[third:fourth]) != original


def test_an_unreadable_cursor_replays_the_whole_log(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a") as outbox:
        _fill(outbox, 2)
        outbox.pending(10)
        outbox.ack(2)
    (tmp_dir / "a.cursor").write_text("garbage")

    with Outbox(tmp_dir, "a") as reopened:
        assert _ids(reopened.pending(10)) == ["e-0", "e-1"]


def test_a_lost_cursor_after_truncation_replays_what_the_log_holds(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a", truncate_threshold=0) as outbox:
        _fill(outbox, 40)
        outbox.pending(100)
        outbox.ack(40)
        for i in range(40, 43):
            outbox.append("sup.task.x.n1.t", f"e-{i}", b"p")
    (tmp_dir / "a.cursor").unlink()

    with Outbox(tmp_dir, "a") as reopened:
        assert reopened.backlog == 3
        first = reopened.pending(2)
        assert [(r.seq, r.msg_id) for r in first] == [(41, "e-40"), (42, "e-41")]
        assert [r.msg_id for r in reopened.pending(2, after=42)] == ["e-42"]


def test_the_log_is_truncated_once_fully_acked_and_big(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a", truncate_threshold=512) as outbox:
        _fill(outbox, 40)
        log = tmp_dir / "a.log"
        assert log.stat().st_size > 512

        outbox.pending(20)
        outbox.ack(20)
        assert log.stat().st_size > 512  # not everything acked yet

        outbox.pending(100)
        outbox.ack(40)
        assert log.stat().st_size == 0
        assert outbox.backlog == 0
        assert outbox.append("sup.task.x.n1.t", "after", b"p") == 41

    with Outbox(tmp_dir, "a") as reopened:
        assert [(r.seq, r.msg_id) for r in reopened.pending(10)] == [(41, "after")]


def test_a_cursor_beyond_the_end_of_the_file_means_all_acked(tmp_dir: Path) -> None:
    """What a crash between persisting the cursor and truncating the log leaves behind."""
    (tmp_dir / "a.log").write_bytes(b"")
    (tmp_dir / "a.cursor").write_text("17\n")

    with Outbox(tmp_dir, "a") as outbox:
        assert outbox.backlog == 0
        assert outbox.pending(10) == []
        assert outbox.append("sup.task.x.n1.t", "next", b"p") == 18


def test_orphans_are_adopted_first_and_deleted_once_acked(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "dead") as dead:
        _fill(dead, 3, prefix="dead")
        dead.pending(10)
        dead.ack(1)
    with Outbox(tmp_dir, "live") as live:
        _fill(live, 2, prefix="live")

        adopted = live.adopt_orphans()

        assert adopted == 2
        assert live.backlog == 4
        first = live.pending(10)
        assert _ids(first) == ["dead-1", "dead-2"]
        live.ack(first[-1].seq)
        assert not (tmp_dir / "dead.log").exists()
        assert not (tmp_dir / "dead.cursor").exists()
        assert _ids(live.pending(10)) == ["live-0", "live-1"]
        assert live.backlog == 2


def test_an_orphan_partly_acked_keeps_its_place(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "dead") as dead:
        _fill(dead, 3, prefix="dead")
    with Outbox(tmp_dir, "live") as live:
        _fill(live, 1, prefix="live")
        live.adopt_orphans()

        live.ack(live.pending(1)[0].seq)

        assert _ids(live.pending(10)) == ["dead-1", "dead-2"]
        assert (tmp_dir / "dead.cursor").read_text() == "1\n"


def test_a_live_outbox_is_not_adopted(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "other") as other, Outbox(tmp_dir, "me") as me:
        _fill(other, 2)

        assert me.adopt_orphans() == 0
        assert me.pending(10) == []
        assert other.backlog == 2


def test_a_fully_acked_orphan_is_just_removed(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "dead") as dead:
        _fill(dead, 2)
        dead.pending(10)
        dead.ack(2)
    (tmp_dir / "stray.cursor").write_text("5\n")  # an orphan's cursor whose log is gone

    with Outbox(tmp_dir, "me") as me:
        assert me.adopt_orphans() == 0
        assert sorted(p.name for p in tmp_dir.iterdir()) == ["me.log"]


def test_a_killed_process_loses_nothing(tmp_dir: Path) -> None:
    """A real crash: the child appends without any fsync or close, then SIGKILLs itself."""
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from supervisor.eventlog.outbox import Outbox
        outbox = Outbox(Path({str(tmp_dir)!r}), "child")
        for i in range(500):
            outbox.append("sup.task.x.n1.t", f"c-{{i}}", b"x" * 100)
        outbox.pending(100)
        outbox.ack(100)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=Path(__file__).parent.parent, check=False
    )
    assert proc.returncode == -9

    with Outbox(tmp_dir, "me") as me:
        assert me.adopt_orphans() == 400
        records = me.pending(1000)

    assert _ids(records) == [f"c-{i}" for i in range(100, 500)]


def test_memory_stays_bounded_while_the_backlog_grows(tmp_dir: Path) -> None:
    payload = b"x" * 1000
    with Outbox(tmp_dir, "a", memory_limit=20_000) as outbox:
        for i in range(200):
            outbox.append("sup.task.x.n1.t", f"m-{i}", payload)

        assert outbox.backlog == 200
        assert outbox.resident < 20

        seen: list[str] = []
        while batch := outbox.pending(7):
            seen.extend(_ids(batch))
            assert outbox.resident < 20
            outbox.ack(batch[-1].seq)
        assert seen == [f"m-{i}" for i in range(200)]

    with Outbox(tmp_dir, "a", memory_limit=20_000) as reopened:
        assert reopened.backlog == 0


def test_spilled_records_are_reloaded_on_open(tmp_dir: Path) -> None:
    with Outbox(tmp_dir, "a", memory_limit=5_000) as outbox:
        for i in range(50):
            outbox.append("sup.task.x.n1.t", f"m-{i}", b"y" * 500)

    with Outbox(tmp_dir, "a", memory_limit=5_000) as reopened:
        assert reopened.resident < 10
        seen: list[str] = []
        while first := reopened.pending(3):
            # A second batch in flight, as the relay does; it may be empty at the bound.
            second = reopened.pending(3, after=first[-1].seq)
            seen.extend(_ids(first + second))
            reopened.ack((second or first)[-1].seq)
            assert reopened.resident < 10

    assert seen == [f"m-{i}" for i in range(50)]


def test_sync_is_safe_after_close(tmp_dir: Path) -> None:
    outbox = Outbox(tmp_dir, "a")
    _fill(outbox, 1)
    assert outbox.dirty
    outbox.sync()
    assert not outbox.dirty
    outbox.close()

    outbox.sync()
    with pytest.raises(OutboxError, match="closed"):
        outbox.append("sup.a.b.c.d", "x", b"")
    assert os.listdir(tmp_dir) == ["a.log"]


_PARALLEL_CLIENT = textwrap.dedent(
    """
    import sys, uuid
    from pathlib import Path
    from schemas.errors import OutboxError
    from supervisor.eventlog.outbox import Outbox

    directory, rounds = Path(sys.argv[1]), int(sys.argv[2])
    failures = 0
    for _ in range(rounds):
        try:
            box = Outbox(directory, uuid.uuid4().hex[:16])
        except OutboxError as e:
            failures += 1
            print(e, file=sys.stderr)
            continue
        box.adopt_orphans()
        box.append("sup.task.submitted.n1.t", uuid.uuid4().hex, b"x")
        box.sync()
        box.ack(1)
        box.close()
    print(failures)
    """
)


def test_parallel_processes_never_take_each_others_new_log(tmp_dir: Path) -> None:
    """Every process creates its own log while the others adopt whatever is unlocked: a
    log must be locked before its name is visible, or an adopter takes and deletes it."""
    directory = tmp_dir / "outbox"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PARALLEL_CLIENT, str(directory), "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(12)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    failures = [int(out.strip() or b"-1") for out, _ in outputs]
    errors = b"".join(err for _, err in outputs).decode()
    assert failures == [0] * 12, errors
    # Every record was acked: a last process adopts what the others left and owns the rest.
    with Outbox(directory, "last") as last:
        assert last.adopt_orphans() == 0
        assert sorted(p.name for p in directory.iterdir()) == ["last.log"]
