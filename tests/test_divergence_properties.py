"""Properties of the divergence rules over generated projected states: nothing outside
this node's managed containers is ever targeted; live work is never touched; the verdict
does not depend on the order of the rows; a divergence found stays found."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.policy.divergence import (
    decide,
)
from tests.divergence_world import CFG, NOW, World

# --- properties ----------------------------------------------------------------------------

_INSTANCES = ("live", "dead", "stopped", "silent")


@st.composite
def worlds(draw: st.DrawFn) -> World:
    w = World()
    w.serve("live", heartbeat_s_ago=draw(st.floats(0, 19)))
    w.serve("dead", heartbeat_s_ago=draw(st.floats(21, 1000)))
    w.serve("stopped").stopped("stopped")
    w.run_instance("silent")
    for i in range(draw(st.integers(0, 6))):
        tid = f"t-{i}"
        iid = draw(st.sampled_from(_INSTANCES))
        ended = draw(st.booleans())
        w.task(
            tid,
            state="succeeded" if ended else "running",
            finished_seq=100 + i if ended else None,
            quiet_s=draw(st.floats(0, 500)),
        )
        attempt_done = ended or draw(st.booleans())
        w.attempt(
            tid,
            1,
            iid,
            finished_seq=99 if attempt_done else None,
            started_s_ago=draw(st.floats(0, 2000)),
        )
        if draw(st.booleans()):
            w.container(
                f"c{i}",
                tid,
                1,
                iid,
                state=draw(st.sampled_from(["running", "exited", "created"])),
                created_s_ago=draw(st.floats(0, 500)),
                deadline_in_s=draw(st.floats(-500, 500)),
                observed=draw(st.booleans()),
                recorded=draw(st.booleans()),
                node=draw(st.sampled_from(["n1", "n1", "n2"])),
                managed=draw(st.booleans()),
                failed_seq=draw(st.sampled_from([None, 60])),
            )
        if draw(st.booleans()):
            w.workspace(
                f"{tid}.1.ab",
                tid,
                1,
                iid,
                created_s_ago=draw(st.floats(0, 500)),
                observed=draw(st.booleans()),
                recorded=draw(st.booleans()),
            )
    return w


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_nothing_but_this_nodes_managed_containers_is_ever_targeted(w: World) -> None:
    state = w.build()
    for d in decide(state, NOW, CFG):
        if d.resource_kind != "container":
            continue
        seen = state.inventory.containers.get(d.resource)
        if seen is not None:
            assert seen.managed and seen.node_id == "n1", d
        else:  # absent: only recording that a container of this node is gone
            assert d.rule == "vanished_container" and state.containers[d.resource].node_id == "n1"


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_running_work_of_a_live_daemon_within_its_deadline_is_never_touched(w: World) -> None:
    state = w.build()
    for d in decide(state, NOW, CFG):
        att = state.attempts.get((d.task_id, d.attempt))
        task = state.tasks.get(d.task_id)
        alive = att is not None and att.instance_id == "live" and att.finished_seq is None
        if alive and task is not None and task.finished_seq is None:
            seen = state.inventory.containers.get(d.resource)
            assert d.resource_kind != "attempt", d
            assert d.rule != "orphan_container", d
            if d.rule == "overdue_container":
                assert seen is not None and seen.deadline is not None and seen.deadline < NOW


@settings(max_examples=200, deadline=None)
@given(worlds(), st.randoms())
def test_the_verdict_does_not_depend_on_the_order_of_the_rows(w: World, rnd: random.Random) -> None:
    state = w.build()

    def shuffled(m: dict) -> dict:  # type: ignore[type-arg]
        items = list(m.items())
        rnd.shuffle(items)
        return dict(items)

    inv = dataclasses.replace(
        state.inventory,
        containers=shuffled(dict(state.inventory.containers)),
        workspaces=shuffled(dict(state.inventory.workspaces)),
    )
    other = dataclasses.replace(
        state,
        inventory=inv,
        containers=shuffled(dict(state.containers)),
        workspaces=shuffled(dict(state.workspaces)),
        attempts=shuffled(dict(state.attempts)),
    )
    assert decide(other, NOW, CFG) == decide(state, NOW, CFG)


@settings(max_examples=200, deadline=None)
@given(worlds(), st.floats(0, 3600))
def test_a_divergence_found_stays_found_as_time_passes(w: World, later_s: float) -> None:
    state = w.build()
    now_found = {(d.resource_kind, d.resource) for d in decide(state, NOW, CFG)}
    later = NOW + timedelta(seconds=later_s)
    assert now_found <= {(d.resource_kind, d.resource) for d in decide(state, later, CFG)}
