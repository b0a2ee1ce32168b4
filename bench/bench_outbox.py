"""Side by side: raw nats-py `publish_async` against the same events through the outbox.

    .venv/bin/python bench/bench_outbox.py [--events N] [--rounds R] [--sync-cost] [--signing]

Starts its own nats-server (in a temp dir, removed afterwards) and, in one run, measures
for each round:

* raw: `js.publish_async` of N pre-encoded event payloads to `SUP_EVENTS`, each with its
  `Nats-Msg-Id`, then waiting for every ack (nats-py's own pipelining, 4000 in flight);
* outbox: the same N events (fresh ids, so deduplication skips nothing) through
  `EventLog.emit` (encode, append to the outbox) and `flush()` (fsync, relay, acks).

Each run checks that exactly N messages landed (the stream denies purging: the runs append
to one stream). The two alternate which goes first. Prints msgs/s for each
round, and the ratio outbox/raw both as best round against best round and as the median of
the per-round ratios (robust when other work shares the machine); target >= 0.8.

With `--signing`, the outbox with each event signed by a node key (`EventSigner`, Ed25519)
against the same outbox unsigned, alternated; target >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from projections.stream.decode import decode_batch, stage
from schemas import AttemptFinished, Event, Evidence, encode_event
from schemas.streams import EVENTS_STREAM, EventSigner, new_seed
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_client import MSG_ID_HEADER, connect_nats, ensure_streams
from supervisor.eventlog.nats_server import REPO_CONF, NatsServer


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


async def run_outbox(
    url: str,
    data_dir: Path,
    events: list[Event],
    instance: str,
    replicas: int = 1,
    signer: EventSigner | None = None,
) -> float:
    log = EventLog(data_dir, url, instance_id=instance, replicas=replicas, signer=signer)
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


async def _measured(url: str, run: Coroutine[Any, Any, float], n: int) -> float:
    """Run one measurement and check that exactly `n` messages landed (the stream cannot be
    purged: `SUP_EVENTS` denies it, so each run appends to what the others wrote)."""
    before = await stream_messages(url)
    elapsed = await run
    stored = await stream_messages(url) - before
    if stored != n:
        raise RuntimeError(f"expected {n} new messages in {EVENTS_STREAM}, found {stored}")
    return elapsed


async def stream_messages(url: str) -> int:
    nc = await connect_nats(url, reconnect=False)
    try:
        return int((await nc.jetstream().stream_info(EVENTS_STREAM)).state.messages)
    finally:
        await nc.close()


async def sync_cost(n: int, rounds: int) -> int:
    """The outbox's throughput against a server with `sync_interval: always` (the repo's
    nats.conf) and one with NATS's default (fsync every 2 minutes), alternated in one run."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbox-sync-"))
    default_conf = workdir / "nats-default-sync.conf"
    default_conf.write_text(
        "\n".join(
            line
            for line in REPO_CONF.read_text().splitlines()
            if not line.strip().startswith("sync_interval")
        )
    )
    servers = {
        "always": NatsServer(workdir / "always"),
        "default": NatsServer(workdir / "default", conf=default_conf),
    }
    try:
        urls = {k: s.start() for k, s in servers.items()}
        for url in urls.values():
            nc = await connect_nats(url, reconnect=False)
            await ensure_streams(nc.jetstream(), url=url)
            await nc.close()
        rates: dict[str, list[float]] = {"always": [], "default": []}
        for r in range(rounds):
            order = ["always", "default"] if r % 2 == 0 else ["default", "always"]
            for kind in order:
                seconds = await _measured(
                    urls[kind],
                    run_outbox(
                        urls[kind], workdir / f"data-{kind}", make_events(n), f"sync-{kind}-{r}"
                    ),
                    n,
                )
                rates[kind].append(n / seconds)
            print(
                f"round {r + 1}: always {rates['always'][-1]:>9,.0f} msgs/s   "
                f"default {rates['default'][-1]:>9,.0f} msgs/s   "
                f"ratio {rates['always'][-1] / rates['default'][-1]:.2f}"
            )
        paired = statistics.median(
            a / d for a, d in zip(rates["always"], rates["default"], strict=True)
        )
        print(f"events: {n}, rounds: {rounds}")
        print(f"outbox, sync_interval always  : {max(rates['always']):>9,.0f} msgs/s (best)")
        print(f"outbox, sync_interval default : {max(rates['default']):>9,.0f} msgs/s (best)")
        print(f"ratio always/default          : {paired:.2f} median per round")
        return 0
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def signing_cost(n: int, rounds: int) -> int:
    """The outbox's rate with every event signed against unsigned, alternated."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    server = NatsServer(workdir / "nats")
    signer = EventSigner(new_seed())
    try:
        url = server.start()
        nc = await connect_nats(url, reconnect=False)
        await ensure_streams(nc.jetstream(), url=url)
        await nc.close()
        rates: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for signed in (r % 2 == 0, r % 2 != 0):
                data = workdir / f"data-{r}-{signed}"
                run = run_outbox(
                    url, data, make_events(n), f"b-{r}", signer=signer if signed else None
                )
                rates[signed].append(n / await _measured(url, run, n))
            print(
                f"round {r + 1}: unsigned {rates[False][-1]:>9,.0f} msgs/s   "
                f"signed {rates[True][-1]:>9,.0f} msgs/s   "
                f"ratio {rates[True][-1] / rates[False][-1]:.2f}"
            )
        paired = statistics.median(s / u for s, u in zip(rates[True], rates[False], strict=True))
        print(f"events: {n}, rounds: {rounds}")
        print(f"outbox, unsigned : {max(rates[False]):>9,.0f} msgs/s (best)")
        print(f"outbox, signed   : {max(rates[True]):>9,.0f} msgs/s (best)")
        print(f"ratio signed/unsigned: {paired:.2f} median per round (target >= 0.9)")
        decode = _decode_cost(signer, make_events(n), rounds)
        print(
            f"projection decode of the same events (every one an end, so every one checked): "
            f"signed/unsigned time {decode:.2f}"
        )
        return 0 if paired >= 0.9 else 1
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _decode_cost(signer: EventSigner, events: list[Event], rounds: int) -> float:
    """How much longer the projection's decode (`decode_batch` + `stage`, one thread) takes
    over signed payloads than over the same unsigned: best of `rounds`, alternated."""
    plain = [encode_event(e) for e in events]
    signed = [signer.sign(p) for p in plain]
    subjects = [e.subject() for e in events]
    seqs = list(range(1, len(events) + 1))
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for is_signed, datas in ((False, plain), (True, signed)):
            t = time.perf_counter()
            stage(decode_batch(seqs, subjects, [0] * len(seqs), datas))
            best[is_signed] = min(best[is_signed], time.perf_counter() - t)
    return best[True] / best[False]


async def main(n: int, rounds: int) -> int:
    # A SIGTERM (e.g. `timeout`) still stops the server and removes the temp dir.
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
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
            # Alternate which goes first, so a drift in machine load hits both alike.
            raw_first = r % 2 == 0
            if raw_first:
                raw_s = await _measured(url, run_raw(url, make_events(n)), n)
            outbox_s = await _measured(
                url, run_outbox(url, workdir / "data", make_events(n), f"bench-{r}"), n
            )
            if not raw_first:
                raw_s = await _measured(url, run_raw(url, make_events(n)), n)
            raw_rates.append(n / raw_s)
            outbox_rates.append(n / outbox_s)
            print(
                f"round {r + 1}: raw {n / raw_s:>9,.0f} msgs/s ({raw_s:.3f} s)   "
                f"outbox {n / outbox_s:>9,.0f} msgs/s ({outbox_s:.3f} s)   "
                f"ratio {raw_s / outbox_s:.2f}"
            )
        raw, outbox = max(raw_rates), max(outbox_rates)
        paired = statistics.median(o / w for o, w in zip(outbox_rates, raw_rates, strict=True))
        print(f"events: {n}, rounds: {rounds}")
        print(f"raw js.publish_async : {raw:>9,.0f} msgs/s (best round)")
        print(f"EventLog emit+flush  : {outbox:>9,.0f} msgs/s (best round)")
        print(f"ratio outbox/raw     : {outbox / raw:.2f} best/best, {paired:.2f} median per round")
        print("target               : >= 0.8")
        return 0 if min(outbox / raw, paired) >= 0.8 else 1
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sync-cost",
        action="store_true",
        help="measure what sync_interval: always costs the outbox instead",
    )
    parser.add_argument(
        "--signing",
        action="store_true",
        help="measure what signing every event costs the outbox instead",
    )
    args = parser.parse_args()
    run = sync_cost if args.sync_cost else signing_cost if args.signing else main
    sys.exit(asyncio.run(run(args.events, args.rounds)))
