"""Side by side: a raw ordered-consumer read of SUP_EVENTS against a replay of the same
stream into a fresh DuckDB projection.

    .venv/bin/python bench/bench_replay.py [--events N] [--rounds R] [--public] [--signed]

Starts its own nats-server (in a temp dir, removed afterwards), publishes N realistic mixed
events (whole task histories: successes, retried timeouts, user errors, OOM kills,
rejections; `testing.synthetic.mixed_history`) with `publish_async` and their
`Nats-Msg-Id`, then, in each round:

* raw: an ordered push consumer over the whole stream with a callback that only counts
  (nats-py's fastest read: no decoding, no writes);
* replay: `projections.serve.replay` into a new file: decode and validate every event, stage it
  as Arrow, apply it with set-based SQL, write the file and rename it into place.

With `--public`, each round also replays through the public pull path alone (the
quarantined lean reader of `projections.stream.bulkread` turned off), to show what that
reader gains. With `--signed`, every event is published signed (as a daemon's are), so the
replay checks the signature of each end as it does on a real history. The contenders
alternate which goes first. Prints msgs/s for each, and the ratio replay/raw as
best against best and as the median of the per-round ratios (robust when other work
shares the machine); target >= 0.5.
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
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import nats
from nats.js.api import DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # testing/ is not installed

import projections.serve.projector as projector_module
from projections.serve.replay import replay
from schemas import encode_event
from schemas.streams import EventSigner, new_seed
from supervisor.eventlog.nats_server import NatsServer
from testing.loadgen import Item, publish
from testing.synthetic import EPOCH, mixed_history

CHUNK = 100_000
TARGET = 0.5


async def load(url: str, n: int, signed: bool = False) -> int:
    """Publish n events in chunks (each chunk is whole tasks, with its own ids and times),
    each signed by the node's key with `signed`."""
    last = 0
    run = uuid.uuid4().hex[:12]
    signer = EventSigner(new_seed())
    for i, start in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - start)
        events = mixed_history(
            size, seed=i, id_prefix=f"{run}-{i:03d}", start=EPOCH + timedelta(hours=i)
        )
        items: Iterable[Item] = events
        if signed:
            items = [(e.subject(), signer.sign(encode_event(e))) for e in events]
        last = await publish(url, items)
    return last


async def raw_read(url: str, n: int) -> float:
    """Seconds to read all n messages with an ordered push consumer that only counts."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        done = asyncio.Event()
        count = 0

        async def cb(msg: object) -> None:
            nonlocal count
            count += 1
            if count >= n:
                done.set()

        started = time.perf_counter()
        sub = await js.subscribe(
            "sup.>", cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        await done.wait()
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


async def replay_once(url: str, path: Path, n: int, *, public: bool = False) -> float:
    lean = projector_module.lean_supported
    if public:
        projector_module.lean_supported = lambda: False  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        result = await replay(path, url)
        elapsed = time.perf_counter() - started
    finally:
        projector_module.lean_supported = lean  # type: ignore[assignment]
    if result.applied != n:
        raise SystemExit(f"replay applied {result.applied} events, expected {n}")
    path.unlink()
    return elapsed


async def main(n: int, rounds: int, public: bool, signed: bool = False) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    server = NatsServer(tmp / "nats")
    try:
        url = server.start()
        t0 = time.perf_counter()
        last = await load(url, n, signed)
        print(f"published {last:,} events in {time.perf_counter() - t0:.1f}s", flush=True)
        await raw_read(url, n)  # warm the stream's pages
        raws, replays, publics = [], [], []
        contenders = ["raw", "replay", *(["public"] if public else [])]
        for r in range(rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for what in order:
                if what == "raw":
                    raws.append(n / await raw_read(url, n))
                elif what == "replay":
                    replays.append(n / await replay_once(url, tmp / "bench.duckdb", n))
                else:
                    publics.append(n / await replay_once(url, tmp / "bench.duckdb", n, public=True))
            ratio = replays[-1] / raws[-1]
            extra = (
                f"  public {publics[-1]:,.0f} msg/s ({publics[-1] / raws[-1]:.2f})"
                if public
                else ""
            )
            print(
                f"round {r + 1}: raw {raws[-1]:,.0f} msg/s  replay {replays[-1]:,.0f} "
                f"msg/s  ratio {ratio:.2f}{extra}",
                flush=True,
            )
        best = max(replays) / max(raws)
        median = statistics.median(p / q for p, q in zip(replays, raws, strict=True))
        print(f"raw ordered-consumer read: {max(raws):,.0f} msg/s (best of {rounds})")
        print(f"replay into DuckDB:        {max(replays):,.0f} msg/s (best of {rounds})")
        if public:
            pub = statistics.median(p / q for p, q in zip(publics, raws, strict=True))
            gain = statistics.median(p / q for p, q in zip(replays, publics, strict=True))
            print(
                f"public pull path only:     {max(publics):,.0f} msg/s (best of {rounds}); "
                f"ratio public/raw median {pub:.2f}; the lean reader gains {gain:.2f}x"
            )
        verdict = "meets" if median >= TARGET else "MISSES"
        print(f"ratio replay/raw: best {best:.2f}, median {median:.2f} ({verdict} target {TARGET})")
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to publish")
    parser.add_argument("--rounds", type=int, default=3, help="raw/replay rounds")
    parser.add_argument(
        "--public", action="store_true", help="also replay through the public pull path alone"
    )
    parser.add_argument(
        "--signed", action="store_true", help="publish every event signed, as a daemon does"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.events, args.rounds, args.public, args.signed)))
