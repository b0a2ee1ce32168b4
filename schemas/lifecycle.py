"""The lifecycle state machine of a task and of the resources of its attempts.

Defined once and used by the executor (which asserts its own transitions), by the projector
(current state) and by the audit (which replays history against it). Pure: no I/O.

Task:      (none) -submitted-> submitted -rejected-> rejected   (none) -rejected-> rejected
           (none)|submitted|refused -refused-> refused -submitted-> submitted
           submitted|retrying -attempt.started-> running -attempt.finished-> attempt_done
           attempt_done -retry_scheduled-> retrying
           attempt_done -succeeded|failed-> succeeded|failed
           running -failed-> failed              (an attempt that could not finish, e.g. lost)
Container: (none) -created-> created -started-> running -exited-> exited
           created|running|exited -removed-> removed
Workspace: (none) -created-> present -removed-> removed

Within an attempt, every container/workspace/kill/cleanup/error event is emitted before the
attempt's `attempt.finished`, so no event of an attempt follows its terminal event.
"""

from __future__ import annotations

from typing import Final, Literal

TaskState = Literal[
    "submitted",
    "refused",
    "running",
    "attempt_done",
    "retrying",
    "succeeded",
    "failed",
    "rejected",
]
ContainerState = Literal["created", "running", "exited", "removed"]
WorkspaceState = Literal["present", "removed"]

TERMINAL_TASK_STATES: Final[frozenset[str]] = frozenset({"succeeded", "failed", "rejected"})
RESTING_TASK_STATES: Final[frozenset[str]] = frozenset({"refused"})
"""Not terminal, yet at rest for good unless submitted again: a submission refused for a
passing reason (a full queue, a full disk) queued nothing, so the id stays free."""

_TASK: Final[dict[tuple[str | None, str], TaskState]] = {
    (None, "task.submitted"): "submitted",
    ("submitted", "task.rejected"): "rejected",
    (None, "task.rejected"): "rejected",  # refused before it was accepted (spec, policy)
    ("refused", "task.rejected"): "rejected",
    (None, "task.refused"): "refused",  # a passing refusal before anything was recorded
    ("submitted", "task.refused"): "refused",
    ("refused", "task.refused"): "refused",
    ("refused", "task.submitted"): "submitted",  # the same id, submitted again
    ("submitted", "attempt.started"): "running",
    ("retrying", "attempt.started"): "running",
    ("running", "attempt.finished"): "attempt_done",
    ("attempt_done", "task.retry_scheduled"): "retrying",
    ("attempt_done", "task.succeeded"): "succeeded",
    ("attempt_done", "task.failed"): "failed",
    ("running", "task.failed"): "failed",
    ("retrying", "task.failed"): "failed",
}

_CONTAINER: Final[dict[tuple[str | None, str], ContainerState]] = {
    (None, "container.created"): "created",
    ("created", "container.started"): "running",
    ("running", "container.exited"): "exited",
    ("created", "container.exited"): "exited",
    ("created", "removed"): "removed",
    ("running", "removed"): "removed",
    ("exited", "removed"): "removed",
}

_WORKSPACE: Final[dict[tuple[str | None, str], WorkspaceState]] = {
    (None, "workspace.created"): "present",
    ("present", "removed"): "removed",
}

TASK_EVENT_TYPES: Final[frozenset[str]] = frozenset(t for _, t in _TASK)


class InvalidTransition(ValueError):
    def __init__(self, machine: str, state: str | None, event_type: str) -> None:
        self.machine = machine
        self.state = state
        self.event_type = event_type
        super().__init__(f"{machine}: no transition from {state or '(none)'} on {event_type}")


def next_task_state(state: str | None, event_type: str) -> TaskState:
    """The task's state after `event_type`; raises InvalidTransition if it cannot happen."""
    try:
        return _TASK[(state, event_type)]
    except KeyError:
        raise InvalidTransition("task", state, event_type) from None


def next_container_state(state: str | None, event_type: str) -> ContainerState:
    """`event_type` is a container event type, or "removed" for a successful removal step."""
    try:
        return _CONTAINER[(state, event_type)]
    except KeyError:
        raise InvalidTransition("container", state, event_type) from None


def next_workspace_state(state: str | None, event_type: str) -> WorkspaceState:
    try:
        return _WORKSPACE[(state, event_type)]
    except KeyError:
        raise InvalidTransition("workspace", state, event_type) from None


def is_terminal(state: str | None) -> bool:
    return state in TERMINAL_TASK_STATES


def is_at_rest(state: str | None) -> bool:
    """Terminal, or refused: nothing more is due of the task unless it is submitted again."""
    return state in TERMINAL_TASK_STATES or state in RESTING_TASK_STATES


def _progression(machine: dict[tuple[str | None, str], str]) -> tuple[str, ...]:
    """A machine's states from its first to its last: each after every state that leads
    to it (a topological order of the transitions, which form no cycle)."""
    order: list[str] = []
    pending = {b for _, b in machine.items()}
    while pending:
        ready = sorted(
            b
            for b in pending
            if all(a is None or a in order or a == b for (a, _), t in machine.items() if t == b)
        )
        if not ready:
            raise RuntimeError("lifecycle: the transitions form a cycle")
        order.extend(ready)
        pending -= set(ready)
    return tuple(order)


CONTAINER_PROGRESSION: Final[tuple[str, ...]] = _progression(_CONTAINER)  # type: ignore[arg-type]
"""created, running, exited, removed: how far a container got, in order."""

WORKSPACE_PROGRESSION: Final[tuple[str, ...]] = _progression(_WORKSPACE)  # type: ignore[arg-type]
"""present, removed."""


_CONTAINER_EVENTS: Final[frozenset[str]] = frozenset(
    {"container.created", "container.started", "container.exited"}
)


class LifecycleTracker:
    """Folds the events one process emits through the machines, as they are emitted.

    `observe` returns the InvalidTransition an event would make (and leaves the state
    alone), else None. A task first seen in the middle of its life (a redelivered message
    continues a history this process did not see) is tracked from its next task event
    that the machine accepts from any earlier state; a task is forgotten at its terminal
    state and a container once removed, so the memory is that of the work in flight.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, str] = {}
        self.containers: dict[str, str] = {}

    def observe(
        self,
        event_type: str,
        task_id: str,
        *,
        container_id: str | None = None,
        step: str | None = None,
        ok: bool = True,
    ) -> InvalidTransition | None:
        if event_type in TASK_EVENT_TYPES:
            return self._task(event_type, task_id)
        if container_id is None:
            return None
        if event_type in _CONTAINER_EVENTS:
            return self._container(event_type, container_id)
        if event_type == "cleanup.succeeded" and step == "remove_container":
            return self._container("removed", container_id)
        return None

    def _task(self, event_type: str, task_id: str) -> InvalidTransition | None:
        known = task_id in self.tasks
        state = self.tasks.get(task_id)
        if not known and event_type not in ("task.submitted", "task.rejected", "task.refused"):
            sources = [s for (s, t) in _TASK if t == event_type and s is not None]
            state = sources[0] if sources else None  # joined mid-life: assume a valid source
        try:
            new = next_task_state(state, event_type)
        except InvalidTransition as e:
            return e
        if is_at_rest(new):
            self.tasks.pop(task_id, None)
        else:
            self.tasks[task_id] = new
        return None

    def _container(self, event_type: str, container_id: str) -> InvalidTransition | None:
        try:
            new = next_container_state(self.containers.get(container_id), event_type)
        except InvalidTransition as e:
            return e
        if new == "removed":
            self.containers.pop(container_id, None)
        else:
            self.containers[container_id] = new
        return None


# --- who may finish an attempt ------------------------------------------------------------
#
# The projection believes the lifecycle, not the last writer: an event that claims to end
# an attempt counts only when it comes from the instance that started the attempt, with
# two exceptions the design needs: another instance closes an attempt whose owner died,
# always as an infrastructure failure (`SUPERVISOR_LOST`, or the reconciler's codes); and
# once an attempt is finished, whichever instance handles the task's next delivery may end
# the task. Anything else (a forgery, a node that went on after it was presumed dead) is
# kept in `events` and shown by the `terminal_conflicts` view, and changes no row.
# The rule is written here once, as Python and as SQL side by side: the declarations of the
# projection's tables (`projections.store.current`) name the pair, so the fold and the
# MERGE made from them use it; `projections.audit` and a client waiting for a task's
# result (`supervisor.intake.wait`) call the Python form.

CLOSING_ERROR_TYPE: Final = "infrastructure"
"""The only error type with which an instance may close another instance's attempt."""


def attempt_finish_applies(
    instance: str, starter: str | None, error_type: str | None, proof: str | None = None
) -> bool:
    """Whether an `attempt.finished` from `instance` ends an attempt started by `starter`;
    never one whose `proof` (`Keyring.judge`) says its node did not sign it."""
    if not proven(proof):
        return False
    return starter is None or instance == starter or error_type == CLOSING_ERROR_TYPE


def sql_attempt_finish_applies(instance: str, starter: str, error_type: str, proof: str) -> str:
    return (
        f"({sql_proven(proof)} AND ({starter} IS NULL OR {instance} = {starter} "
        f"OR {error_type} IS NOT DISTINCT FROM '{CLOSING_ERROR_TYPE}'))"
    )


def terminal_applies(
    attempt: int,
    instance: str,
    seq: int,
    starter: str | None,
    finished_seq: int | None,
    proof: str | None = None,
) -> bool:
    """Whether a terminal task event of `attempt` (0: none ran) from `instance` at `seq`
    ends the task, given the attempt's starting instance and the seq it finished at; never
    one whose `proof` says its node did not sign it."""
    if not proven(proof):
        return False
    if attempt == 0:
        return True
    if starter is None:
        return False  # it claims an attempt that never started
    return instance == starter or (finished_seq is not None and finished_seq < seq)


def sql_terminal_applies(
    attempt: str, instance: str, seq: str, starter: str, finished_seq: str, proof: str
) -> str:
    return (
        f"({sql_proven(proof)} AND ({attempt} = 0 OR ({starter} IS NOT NULL AND "
        f"({instance} = {starter} OR coalesce({finished_seq} < {seq}, false)))))"
    )


# --- who wrote an event ---------------------------------------------------------------------
#
# Every node signs its events (`schemas.streams.EventSigner`). The ends of tasks and attempts
# count only when signed by a key of the node they name: the node credential alone (shared
# by a fleet) cannot write another node's outcomes, even with a copied `instance_id`. The
# readers judge a signature the same way, in stream order: the projection, the audit, a
# client waiting for a result.

PROVEN: Final = ("signed", "legacy")
"""Proofs with which an end counts: signed by its node's key; or unsigned from a node that
never signed anything (a history older than signing), unless signatures are required."""

REFUSED_PROOFS: Final = ("unsigned", "bad_signature", "unknown_key")
"""Why an end does not count: no signature from a node whose key is known; a signature that
does not verify (the event was altered, or the key is not one); a valid signature by a key
that is not its node's."""

PROOF_TYPES: Final = (
    "task.succeeded",
    "task.failed",
    "task.rejected",
    "attempt.finished",
    "supervisor.started",
)
"""The events whose signature is checked: the ends, and each instance's start (which is
where a node's key is usually first seen)."""


def proven(proof: str | None) -> bool:
    """Whether an event with this `proof` (None: not checked) may change a task's state."""
    return proof is None or proof in PROVEN


def sql_proven(proof: str) -> str:
    return f"({proof} IS NULL OR {proof} IN {PROVEN!r})"


class Keyring:
    """Which public keys sign for which node. A node in `pinned` (`[signing] keys`, the
    way for a fleet) has exactly those keys (several during a rotation). Any other learns
    its key on first use: the first valid signature seen from it, in stream order, is its
    key from then on (`learned`; `judge` says when it learns one). With `required`, an
    unsigned end is refused even from a node that never signed."""

    def __init__(
        self, pinned: dict[str, tuple[str, ...]] | None = None, *, required: bool = False
    ) -> None:
        self.pinned = dict(pinned or {})
        self.learned: dict[str, str] = {}
        self.required = required

    def keys(self, node_id: str) -> tuple[str, ...]:
        if node_id in self.pinned:
            return self.pinned[node_id]
        return (self.learned[node_id],) if node_id in self.learned else ()

    def judge(self, node_id: str, signer: str | None) -> tuple[str, bool]:
        """The proof of an event from `node_id` signed by `signer` (`payload_signer`'s
        answer: a key, "" for a bad signature, None for none), and whether `signer` was
        just learned as the node's key."""
        if signer == "":
            return "bad_signature", False
        keys = self.keys(node_id)
        if signer is None:
            return ("unsigned" if keys or self.required else "legacy"), False
        if not keys and node_id not in self.pinned:
            self.learned[node_id] = signer
            return "signed", True
        return ("signed" if signer in keys else "unknown_key"), False
