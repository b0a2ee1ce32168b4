"""Side by side: raw nats-py `publish_async` against the same events through the outbox.

    .venv/bin/python bench/bench_outbox.py [--events N] [--rounds R]

Starts its own nats-server (in a temp dir, removed afterwards) and, in one run, measures
for each round:

* raw: `js.publish_async` of N pre-encoded event payloads to `SUP_EVENTS`, each with its
  `Nats-Msg-Id`, then waiting for every ack (nats-py's own pipelining, 4000 in flight);
* outbox: the same N events (fresh ids, so deduplication skips nothing) through
  `EventLog.emit` (encode, append to the outbox) and `flush()` (fsync, relay, acks).

The stream is purged between runs so both write into the same-sized stream. Prints msgs/s
for each and the ratio outbox/raw (the best round of each; target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import AttemptFinished, Event, Evidence, encode_event  # noqa: E402
from supervisor.eventlog import MSG_ID_HEADER, EventLog, connect_nats, ensure_streams  # noqa: E402
from supervisor.natsserver import NatsServer  # noqa: E402
from supervisor.streams import EVENTS_STREAM  # noqa: E402


def make_events(n: int) -> list[Event]:
    """N events of one type and (nearly) one size, over a handful of tasks."""
    now = datetime.now(UTC)
    evidence = Evidence(exit_code=0, kills_issued=(), adapter_message="x" * 64)
    return [
        AttemptFinished(
            event_id=uuid.uuid4().hex,
            occurred_at=now,
            node_id="bench",
            instance_id="bench",
            task_id=f"t-{i % 100:03d}",
            attempt=1,
            correlation_id="c" * 16,
            outcome="succeeded",
            exit_code=0,
            duration_s=0.25,
            evidence=evidence,
        )
        for i in range(n)
    ]


async def run_raw(url: str, events: list[Event]) -> float:
    nc = await connect_nats(url, reconnect=False)
    try:
        js = nc.jetstream()
        prepared = [(e.subject(), encode_event(e), e.event_id) for e in events]
        started = time.perf_counter()
        futures = [
            await js.publish_async(subject, payload, headers={MSG_ID_HEADER: msg_id})
            for subject, payload, msg_id in prepared
        ]
        acks = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        assert not any(a.duplicate for a in acks)
        return elapsed
    finally:
        await nc.close()


async def run_outbox(url: str, data_dir: Path, events: list[Event], instance: str) -> float:
    log = EventLog(data_dir, url, instance_id=instance)
    await log.start()
    try:
        started = time.perf_counter()
        for e in events:
            log.emit(e)
        if not await log.flush(300):
            raise RuntimeError("the outbox did not drain")
        return time.perf_counter() - started
    finally:
        await log.close()


async def stream_messages(url: str, *, purge: bool = False) -> int:
    nc = await connect_nats(url, reconnect=False)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(EVENTS_STREAM)).state.messages
        if purge:
            await js.purge_stream(EVENTS_STREAM)
        return count
    finally:
        await nc.close()


async def main(n: int, rounds: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    server = NatsServer(workdir / "nats")
    try:
        url = server.start()
        nc = await connect_nats(url, reconnect=False)
        await ensure_streams(nc.jetstream(), url=url)
        await nc.close()
        raw_rates: list[float] = []
        outbox_rates: list[float] = []
        for r in range(rounds):
            raw_s = await run_raw(url, make_events(n))
            assert await stream_messages(url, purge=True) == n
            outbox_s = await run_outbox(url, workdir / "data", make_events(n), f"bench-{r}")
            assert await stream_messages(url, purge=True) == n
            raw_rates.append(n / raw_s)
            outbox_rates.append(n / outbox_s)
            print(
                f"round {r + 1}: raw {n / raw_s:>9,.0f} msgs/s ({raw_s:.3f} s)   "
                f"outbox {n / outbox_s:>9,.0f} msgs/s ({outbox_s:.3f} s)   "
                f"ratio {raw_s / outbox_s:.2f}"
            )
        raw, outbox = max(raw_rates), max(outbox_rates)
        print(f"events: {n}, rounds: {rounds}")
        print(f"raw js.publish_async : {raw:>9,.0f} msgs/s (best; median {statistics.median(raw_rates):,.0f})")
        print(
            f"EventLog emit+flush  : {outbox:>9,.0f} msgs/s "
            f"(best; median {statistics.median(outbox_rates):,.0f})"
        )
        print(f"ratio outbox/raw     : {outbox / raw:.2f} (target >= 0.8)")
        return 0 if outbox / raw >= 0.8 else 1
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.events, args.rounds)))
