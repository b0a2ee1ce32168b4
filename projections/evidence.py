"""What the audit reads of each event (`Record`), what it reports (`Violation`), and its
second half: what history recorded, decided again from its own evidence.

Rules, each reported with the task and the stream sequences that prove it:

- `outcome_not_evidence`: an `attempt.finished` whose outcome (its error code, or success)
  is not what the catalogue's `classify` gives for the evidence it records. An attempt
  closed by another instance without observing anything (empty evidence, an
  infrastructure failure: `SUPERVISOR_LOST`, a retired node's) is not judged;
- `evidence_altered`: an attempt's `attempt.finished` records other observations (exit
  code, OOM, pids-limit hits, kills, adapter error) than its container's `container.exited`;
- `terminal_not_attempt`: a `task.succeeded` whose last finished attempt did not succeed;
- `event_after_instance_end`: an event an instance made after it stopped, was superseded
  (`supervisor.superseded`) or its node was retired (`node.retired`), by the time it
  records (`occurred_at`): events it made before and published later, from an outbox
  adopted by its successor, are its own;
- `decision_unjustified`: a `reconcile.decision` of a rule that acts only on what a dead
  instance left (`orphan_container`, `lost_attempt`, `leaked_workspace`) about the
  container, workspace or attempt of an open attempt whose owner was alive when it was
  decided (a heartbeat within the timeout it declared, no stop, supersession or
  retirement), before the container's deadline. Dry runs count too: the rule was wrong.

`Rederivation` is fed the audit's records in stream order (`audit_records` does) and is
pure: it reads nothing but them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import msgspec

from schemas import Evidence
from schemas.catalogue import classify
from schemas.lifecycle import proven


class Record(NamedTuple):
    """What the audit reads of one event."""

    seq: int
    type: str
    task_id: str
    attempt: int
    occurred_at: datetime
    container_id: str | None = None
    step: str | None = None
    resource: str | None = None
    path: str | None = None
    command_id: str | None = None
    dry_run: bool | None = None
    final: bool | None = None
    instance_id: str = ""
    error_type: str | None = None
    node_id: str = ""
    outcome: str | None = None
    error_code: str | None = None
    evidence: str | None = None
    """`attempt.finished`'s or `container.exited`'s evidence, as JSON."""
    superseded_instance: str | None = None
    deadline: float | None = None
    rule: str | None = None
    action: str | None = None
    timeout_s: float | None = None
    proof: str | None = None
    """How the projection judged the signature of an end (`schemas.lifecycle.Keyring`)."""


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    rule: str
    seqs: tuple[int, ...]
    detail: str
    attempt: int | None = None
    resource: str | None = None


RULES = (
    "outcome_not_evidence",
    "evidence_altered",
    "terminal_not_attempt",
    "event_after_instance_end",
    "decision_unjustified",
)
"""The rules of this module, in the order the module's docstring gives them."""

AUDIT_RULES = (
    "task_lifecycle",
    "one_terminal_state",
    "not_signed",
    "not_owner",
    "task_not_terminal",
    "attempt_order",
    "event_after_attempt_finished",
    "container_lifecycle",
    "workspace_lifecycle",
    "container_not_removed",
    "workspace_not_removed",
    "cleanup_unresolved",
    "decision_without_outcome",
    "history_erased",
    *RULES,
)
"""Every rule `projections.audit` reports, as its docstring lists them."""


def refused_end(r: Record, owner: str | None) -> Violation:
    """The violation of an end that is not applied: `not_signed` when its node did not
    sign it (`r.proof`), else `not_owner`."""
    if not proven(r.proof):
        rule = "not_signed"
        why = f"{r.proof} for node {r.node_id}"
    else:
        rule = "not_owner"
        why = "never started" if owner is None else f"owned by instance {owner}"
        why = f"attempt {r.attempt} is {why}"
    return Violation(
        task_id=r.task_id,
        rule=rule,
        seqs=(r.seq,),
        attempt=r.attempt or None,
        detail=f"{r.type} from instance {r.instance_id}: {why}; not applied",
    )


_JUDGED_RULES = ("orphan_container", "lost_attempt", "leaked_workspace")
"""The reconciler's rules that act only on what a dead instance left: one of them about a
live instance's open attempt before its deadline is never justified."""

_FIXED = (
    "exit_code",
    "oom_killed",
    "memory_oom_events",
    "pids_limit_events",
    "kills_issued",
    "external_kills",
    "adapter_error",
)
"""Observations that are settled once the container has exited: `attempt.finished` must
repeat its `container.exited`'s (removal out of band and cancellation may still follow)."""

_EMPTY = Evidence()


@dataclass
class _Attempt:
    owner: str = ""
    finished: bool = False
    outcome: str | None = None
    exited: tuple[int, Evidence] | None = None
    container: str | None = None
    workspace: str | None = None
    deadline: float | None = None


@dataclass
class _Instance:
    node_id: str = ""
    heartbeat_at: datetime | None = None
    heartbeat_seq: int | None = None
    timeout_s: float = 0.0
    ended: tuple[int, datetime, str] | None = None  # seq, when, how
    reported: bool = False


@dataclass
class Rederivation:
    """The state the rules need, built as records come; `violations` collects them."""

    violations: list[Violation] = field(default_factory=list)
    _attempts: dict[tuple[str, int], _Attempt] = field(default_factory=dict)
    _last_finished: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    _instances: dict[str, _Instance] = field(default_factory=dict)
    _by_resource: dict[str, tuple[str, int]] = field(default_factory=dict)

    def feed(self, r: Record, applied: bool) -> None:
        """One record, in stream order; `applied`: the audit let it through (`not_owner`
        ends are not)."""
        inst = self._instances.setdefault(r.instance_id, _Instance(node_id=r.node_id))
        self._instance_end(r, inst)
        if not applied:
            return
        key = (r.task_id, r.attempt)
        if r.type == "attempt.started":
            self._attempts[key] = _Attempt(owner=r.instance_id)
        a = self._attempts.get(key) if r.attempt > 0 else None
        if a is not None:
            self._attempt_record(r, a)
        if r.type == "task.succeeded":
            last = self._last_finished.get(r.task_id)
            if last is None or last[1] != "succeeded":
                self._report(
                    r,
                    "terminal_not_attempt",
                    (r.seq,) if last is None else (last[0], r.seq),
                    "task.succeeded, but "
                    + ("no attempt finished" if last is None else "its last attempt failed"),
                )
        if r.type == "node.heartbeat":
            inst.heartbeat_at, inst.heartbeat_seq = r.occurred_at, r.seq
            inst.timeout_s = r.timeout_s or inst.timeout_s
        if r.type == "reconcile.decision" and r.resource and r.rule in _JUDGED_RULES:
            self._decision(r)

    # --- attempts --------------------------------------------------------------------------

    def _attempt_record(self, r: Record, a: _Attempt) -> None:
        if r.type == "container.created":
            a.container, a.deadline = r.container_id, r.deadline
            if r.container_id:
                self._by_resource[r.container_id] = (r.task_id, r.attempt)
        elif r.type == "workspace.created" and r.path:
            a.workspace = r.path
            self._by_resource[r.path] = (r.task_id, r.attempt)
        elif r.type == "container.exited" and r.evidence is not None:
            a.exited = (r.seq, _evidence(r.evidence))
        elif r.type == "attempt.finished":
            a.finished, a.outcome = True, r.outcome
            self._last_finished[r.task_id] = (r.seq, r.outcome)
            self._finished(r, a)

    def _finished(self, r: Record, a: _Attempt) -> None:
        ev = _evidence(r.evidence) if r.evidence is not None else _EMPTY
        if a.exited is not None:
            seq, seen = a.exited
            changed = [n for n in _FIXED if getattr(seen, n) != getattr(ev, n)]
            if changed:
                self._report(
                    r,
                    "evidence_altered",
                    (seq, r.seq),
                    f"attempt.finished records other {', '.join(changed)} than its "
                    "container.exited",
                )
        if ev == _EMPTY and r.outcome == "failed" and r.error_type == "infrastructure":
            return  # closed by another instance, which observed nothing: not re-derivable
        c = classify(ev)
        derived = None if c is None else c.code
        recorded = r.error_code if r.outcome == "failed" else None
        if derived != recorded:
            self._report(
                r,
                "outcome_not_evidence",
                (r.seq,),
                f"recorded {recorded or 'success'}, its evidence gives {derived or 'success'}",
            )

    # --- instances -------------------------------------------------------------------------

    def _instance_end(self, r: Record, inst: _Instance) -> None:
        if inst.ended is not None and not inst.reported and r.occurred_at > inst.ended[1]:
            inst.reported = True
            self._report(
                r,
                "event_after_instance_end",
                (inst.ended[0], r.seq),
                f"instance {r.instance_id} {inst.ended[2]}, then recorded {r.type}",
            )
        if r.type == "supervisor.stopped" and inst.ended is None:
            inst.ended = (r.seq, r.occurred_at, "stopped")
        elif r.type == "supervisor.superseded" and r.superseded_instance:
            gone = self._instances.setdefault(r.superseded_instance, _Instance(node_id=r.node_id))
            if gone.ended is None:
                gone.ended = (r.seq, r.occurred_at, f"was superseded by {r.instance_id}")
        elif r.type == "node.retired":
            for iid, other in self._instances.items():
                if other.node_id == r.node_id and other.ended is None and iid != r.instance_id:
                    other.ended = (r.seq, r.occurred_at, f"was retired with node {r.node_id}")

    def _alive(self, instance_id: str, at: datetime) -> bool:
        """Alive for certain at `at`: a heartbeat within the timeout it declared, and no
        end recorded by then."""
        inst = self._instances.get(instance_id)
        if inst is None or inst.heartbeat_at is None or not inst.timeout_s:
            return False
        if inst.ended is not None and inst.ended[1] <= at:
            return False
        return at - inst.heartbeat_at <= timedelta(seconds=inst.timeout_s)

    def _decision(self, r: Record) -> None:
        assert r.resource is not None
        name = r.resource
        if "/" in name and not name.startswith("/"):  # `<task>/<attempt>`: a lost attempt
            task_id, _, n = name.rpartition("/")
            key = (task_id, int(n)) if n.isdigit() else None
        else:
            key = self._by_resource.get(name)
        if key is None:
            return
        a = self._attempts.get(key)
        if a is None or a.finished or not self._alive(a.owner, r.occurred_at):
            return
        if a.deadline is not None and r.occurred_at.timestamp() > a.deadline:
            return  # past its deadline: the overdue rule may order it
        self._report(
            r._replace(task_id=key[0], attempt=key[1]),
            "decision_unjustified",
            (r.seq,),
            f"{r.rule or 'a rule'} ordered about {name} of the open attempt {key[1]} of a live "
            f"instance ({a.owner}) before its deadline",
        )

    def _report(self, r: Record, rule: str, seqs: tuple[int, ...], detail: str) -> None:
        self.violations.append(
            Violation(
                task_id=r.task_id,
                rule=rule,
                seqs=seqs,
                detail=detail,
                attempt=r.attempt or None,
                resource=r.resource,
            )
        )


def _evidence(raw: str) -> Evidence:
    try:
        return msgspec.json.decode(raw, type=Evidence)
    except msgspec.DecodeError:
        return _EMPTY
