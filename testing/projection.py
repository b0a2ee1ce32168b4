"""A projection file made straight from a history, without NATS: the events are decoded
and applied as the projector would have (sequences 1, 2, ... in the order given)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from projections.store.store import ProjectionStore
from projections.stream.decode import decode_batch, stage
from schemas import Event, encode_event


def project(history: Sequence[Event], db: Path, *, batch: int = 250_000) -> Path:
    """Apply `history` to the projection file `db` (created if needed), `batch` at a time."""
    with ProjectionStore(db) as store:
        for lo in range(0, len(history), batch):
            part = history[lo : lo + batch]
            payloads = [encode_event(e) for e in part]
            seqs = list(range(lo + 1, lo + len(part) + 1))
            store.apply(
                stage(decode_batch(seqs, [e.subject() for e in part], [0] * len(part), payloads))
            )
    return db
