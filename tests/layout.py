"""The declared layout, held by `tests/test_layout.py` and `tests/test_contract.py`, and read
by `scripts/test` (`python -m tests.layout strict`). `docs/architecture.md` explains it.

`ORDER`: each package's parts (`schemas`, the contract, is flat and imports nothing of the
project) (sub-packages, and top-level modules) in the order data
flows, lowest first. A part may import the parts listed before it and itself, never one
listed after it: every import counts, also one inside a function or under
`TYPE_CHECKING`.

`PURE`: the decisions and the contract. They import only `schemas` and the standard
library (and msgspec), do no I/O, and are type-checked with `mypy --strict`, with
`STRICT_ADAPTERS`, small adapters typed as strictly."""

from __future__ import annotations

import sys

ORDER: dict[str, tuple[str, ...]] = {
    "projections": (
        "errors",  # the read side's branch of the exception tree
        "stream",  # SUP_EVENTS read and decoded into staging batches
        "store",  # the DuckDB file: its schema, how a batch is applied
        "evidence",  # what the audit reads and reports; outcomes decided again
        "audit",  # history judged against the lifecycle
        "query",  # read-only SQL, its rendering, the remote query client
        "serve",  # the projector (stream -> store), replay, the live part
    ),
    "supervisor": (
        "observability",  # logs and metrics: everything may use them
        "policy",  # pure decisions: admission, classification, retry, breaker, ...
        "client",  # the public HTTP client of the API
        "eventlog",  # events out (outbox -> JetStream), history in
        "docker",  # the engine: containers, events, cgroups, the breaker's service
        "intake",  # submissions and cancels in
        "execution",  # the queue, attempts, cleanup, the scheduler
        "daemon",  # one node's host: wiring, HTTP API, monitor, parts' port
        "reconcile",  # a part: divergences found and cleaned up
        "delivery",  # a part: callbacks of the outcomes
        "compose",  # processes assembled from both sides (the projection service)
        "cli",  # the composition root: every command
        "__main__",
    ),
}

# Parts that may import `projections` (the only ones that know both sides).
COMPOSITION_ROOTS = ("supervisor.compose", "supervisor.cli")

PURE: tuple[str, ...] = (
    "schemas",
    "supervisor/policy",
    "projections/store/machine.py",
    "projections/store/rules.py",
    "projections/store/table_fold.py",
    "projections/store/merge.py",
    "projections/store/current.py",
)

STRICT_ADAPTERS: tuple[str, ...] = (
    "supervisor/eventlog/history.py",
    "supervisor/daemon/datadir.py",
    "supervisor/eventlog/diskguard.py",
    "supervisor/eventlog/nats_auth.py",
)


def part_of(dotted: str) -> tuple[str, str] | None:
    """(package, part) of a dotted module name of the project; None outside `ORDER`."""
    names = dotted.split(".")
    if names[0] not in ORDER or len(names) < 2:
        return None
    return names[0], names[1]


def reversed_arrow(importer: str, imported: str) -> bool:
    """Whether module `importer` importing module `imported` goes against `ORDER`."""
    a, b = part_of(importer), part_of(imported)
    if a is None or b is None or a[0] != b[0]:
        return False
    order = ORDER[a[0]]
    if a[1] == "__init__" or a[1] == b[1]:
        return False
    if a[1] not in order or b[1] not in order:
        return True  # an undeclared part is a failure of its own: declare it
    return order.index(b[1]) > order.index(a[1])


if __name__ == "__main__":
    if sys.argv[1:] == ["strict"]:
        print(" ".join((*PURE, *STRICT_ADAPTERS)))
    else:
        sys.exit("usage: python -m tests.layout strict")
