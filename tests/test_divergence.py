"""The divergence rules, without I/O: each rule caused on a hand-built projected state
(`tests.divergence_world`), the precedence between rules and the command ids. The
properties over generated states are in `test_divergence_properties`."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from schemas.projected import (
    SeenContainer,
    seen_container,
    workspace_owner,
)
from supervisor.policy.divergence import (
    RULES,
    command_id,
    decide,
    liveness,
    oldest_leak_s,
    plan,
)
from tests.divergence_world import CFG, INV_SEQ, NOW, ROOT, World, ago, found, only, running_task


def test_orphan_a_container_of_a_task_that_ended() -> None:
    w = World().serve("boot-1").task("t-1", state="succeeded", finished_seq=30, quiet_s=50)
    w.attempt("t-1", 1, "boot-1", finished_seq=29).container(
        "c1", "t-1", 1, "boot-1", state="exited"
    )
    d = only(w)
    assert (d.rule, d.resource, d.action) == ("orphan_container", "c1", "remove_container")
    assert d.evidence == (22, 30, INV_SEQ)
    assert d.reason == "observed, and its task succeeded"
    assert (d.since, d.task_id, d.attempt) == (ago(50), "t-1", 1)


def test_orphan_a_container_of_a_finished_attempt_while_the_task_retries() -> None:
    w = World().serve("boot-1").task("t-1").attempt("t-1", 1, "boot-1", finished_seq=29)
    w.attempt("t-1", 2, "boot-1").container("c1", "t-1", 1, "boot-1", state="exited")
    d = only(w)
    assert (d.rule, d.evidence, d.reason) == (
        "orphan_container",
        (22, 29, INV_SEQ),
        "observed, and its attempt 1 finished",
    )


def test_orphan_a_container_of_an_unknown_task_only_past_the_creation_grace() -> None:
    young = World().container("c1", "t-x", 1, "boot-9", recorded=False, created_s_ago=29)
    old = World().container("c1", "t-x", 1, "boot-9", recorded=False, created_s_ago=31)

    assert found(young) == []
    d = only(old)
    assert (d.rule, d.evidence, d.reason) == (
        "orphan_container",
        (INV_SEQ,),
        "observed, and its task t-x is unknown to the log",
    )


def test_orphan_a_young_container_of_a_dead_instance_at_once() -> None:
    w = running_task(World().serve("boot-1", heartbeat_s_ago=21))
    w.container("c1", "t-1", 1, "boot-1", created_s_ago=5)
    d = only(w)
    assert (d.rule, d.evidence) == ("orphan_container", (11, 22, INV_SEQ))
    assert d.reason == ("observed, and instance boot-1 sent no heartbeat for 21s (timeout 20s)")
    assert d.since == ago(21)


def test_orphan_a_container_of_a_stopped_instance() -> None:
    w = running_task(World().serve("boot-1").stopped("boot-1", seq=90))
    w.container("c1", "t-1", 1, "boot-1")
    assert (only(w).rule, only(w).evidence) == ("orphan_container", (22, 90, INV_SEQ))


def test_the_heartbeat_timeout_an_instance_declared_wins_over_the_config() -> None:
    w = running_task(World().serve("boot-1", heartbeat_s_ago=8))
    inst = w.instances["boot-1"]
    w.instances["boot-1"] = dataclasses.replace(inst, heartbeat_timeout_s=5.0)
    w.container("c1", "t-1", 1, "boot-1")
    assert found(w) == [("orphan_container", "container", "c1")]


def test_live_work_is_never_a_divergence() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1").workspace("t-1.1.ab", "t-1", 1, "boot-1")
    assert found(w) == []


def test_work_of_an_instance_without_heartbeats_is_presumed_alive() -> None:
    w = running_task(World().run_instance("cli-1"), iid="cli-1")
    w.container("c1", "t-1", 1, "cli-1", created_s_ago=500)
    w.workspace("t-1.1.ab", "t-1", 1, "cli-1", created_s_ago=500)
    assert found(w) == []


def test_the_reconciling_instance_is_alive_whatever_the_log_says() -> None:
    w = running_task(World().serve("me", heartbeat_s_ago=500), iid="me")
    w.container("c1", "t-1", 1, "me")
    assert found(w) == []
    assert liveness(w.build(), "me", NOW, CFG).status == "live"


def test_containers_of_another_node_or_without_the_label_are_never_targeted() -> None:
    w = World().task("t-1", state="failed", finished_seq=30, quiet_s=500)
    w.container("c-other", "t-1", 1, "boot-1", node="n2", created_s_ago=500)
    w.container("c-bare", "t-1", 1, "boot-1", managed=False, recorded=False, created_s_ago=500)
    assert found(w) == []


# --- overdue_container --------------------------------------------------------------------


def test_overdue_a_running_container_past_its_deadline_and_grace() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1", deadline_in_s=-11)
    d = only(w)
    assert (d.rule, d.evidence, d.since) == ("overdue_container", (22, INV_SEQ), ago(11))
    assert d.reason == "running 11s past its deadline (grace 10s)"


def test_not_overdue_within_the_grace_or_once_exited() -> None:
    within = running_task(World().serve("boot-1"))
    within.container("c1", "t-1", 1, "boot-1", deadline_in_s=-9)
    exited = running_task(World().serve("boot-1"))
    exited.container("c1", "t-1", 1, "boot-1", deadline_in_s=-500, state="exited")
    assert found(within) == []
    assert found(exited) == []


def test_overdue_takes_the_deadline_from_the_record_when_the_label_lacks_it() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1", deadline_in_s=-60)
    w.seen["c1"] = dataclasses.replace(w.seen["c1"], deadline=None)
    assert found(w) == [("overdue_container", "container", "c1")]


def test_overdue_claims_a_container_before_orphan() -> None:
    w = running_task(World().serve("boot-1", heartbeat_s_ago=60))
    w.container("c1", "t-1", 1, "boot-1", deadline_in_s=-60)
    assert found(w) == [("overdue_container", "container", "c1")]


# --- unresolved_cleanup_failure -----------------------------------------------------------


def test_an_unresolved_cleanup_failure_of_a_container_still_there() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1", state="exited", failed_seq=40)
    d = only(w)
    assert (d.rule, d.evidence, d.since) == ("unresolved_cleanup_failure", (40, INV_SEQ), ago(40))


def test_an_unresolved_cleanup_failure_of_a_workspace_still_on_disk() -> None:
    w = running_task(World().serve("boot-1")).workspace(
        "t-1.1.ab", "t-1", 1, "boot-1", failed_seq=41
    )
    d = only(w)
    assert (d.rule, d.resource_kind, d.action, d.evidence) == (
        "unresolved_cleanup_failure",
        "workspace",
        "remove_workspace",
        (41, INV_SEQ),
    )


def test_a_failure_resolved_since_is_no_divergence() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1", failed_seq=40, removed_seq=41, observed=False)
    assert found(w) == []


# --- vanished_container -------------------------------------------------------------------


def test_vanished_a_recorded_container_absent_from_the_inventory() -> None:
    w = running_task(World().serve("boot-1")).container("c1", "t-1", 1, "boot-1", observed=False)
    d = only(w)
    assert (d.rule, d.resource_kind, d.action, d.evidence, d.since) == (
        "vanished_container",
        "container",
        "remove_container",
        (22, INV_SEQ),
        ago(1),
    )


def test_a_container_created_while_the_listing_ran_is_not_vanished() -> None:
    w = running_task(World().serve("boot-1"))
    w.container("c1", "t-1", 1, "boot-1", observed=False, created_s_ago=2)
    assert found(w) == []


def test_vanished_closes_the_attempt_of_a_dead_instance_as_container_vanished() -> None:
    w = World().serve("boot-1", heartbeat_s_ago=100).task("t-1", quiet_s=61)
    w.attempt("t-1", 1, "boot-1").container("c1", "t-1", 1, "boot-1", observed=False)
    ds = decide(w.build(), NOW, CFG)
    assert [(d.rule, d.resource_kind, d.resource, d.error_code, d.fail_task) for d in ds] == [
        ("vanished_container", "attempt", "t-1/1", "CONTAINER_VANISHED", False),
        ("vanished_container", "container", "c1", None, False),
    ]
    assert ds[0].evidence == (11, 22, INV_SEQ)


def test_vanished_leaves_the_attempt_to_a_redelivery_within_the_grace() -> None:
    w = World().serve("boot-1", heartbeat_s_ago=100).task("t-1", quiet_s=59)
    w.attempt("t-1", 1, "boot-1").container("c1", "t-1", 1, "boot-1", observed=False)
    assert found(w) == [("vanished_container", "container", "c1")]


# --- leaked_workspace and vanished_workspace ----------------------------------------------


def test_leaked_a_workspace_of_a_finished_attempt() -> None:
    w = World().serve("boot-1").task("t-1").attempt("t-1", 1, "boot-1", finished_seq=29)
    w.attempt("t-1", 2, "boot-1").workspace("t-1.1.ab", "t-1", 1, "boot-1")
    d = only(w)
    assert (d.rule, d.resource, d.evidence, d.reason) == (
        "leaked_workspace",
        f"{ROOT}/t-1.1.ab",
        (23, 29, INV_SEQ),
        "on disk, and its attempt 1 finished",
    )


def test_leaked_a_young_workspace_of_a_dead_instance() -> None:
    w = running_task(World().serve("boot-1", heartbeat_s_ago=30))
    w.workspace("t-1.1.ab", "t-1", 1, "boot-1", created_s_ago=3)
    assert found(w) == [("leaked_workspace", "workspace", f"{ROOT}/t-1.1.ab")]


def test_a_dir_the_log_does_not_know_leaks_only_past_the_grace() -> None:
    young = World().workspace("t-9.1.zz", "t-9", 1, "?", recorded=False, created_s_ago=10)
    old = World().workspace("t-9.1.zz", "t-9", 1, "?", recorded=False, created_s_ago=40)
    assert found(young) == []
    d = only(old)
    assert (d.rule, d.task_id, d.attempt, d.evidence) == ("leaked_workspace", "t-9", 1, (INV_SEQ,))


def test_a_dir_recorded_as_removed_yet_on_disk_leaks() -> None:
    w = running_task(World().serve("boot-1"))
    w.workspace("t-1.1.ab", "t-1", 1, "boot-1", removed_seq=44)
    d = only(w)
    assert (d.rule, d.evidence, d.reason) == (
        "leaked_workspace",
        (23, 44, INV_SEQ),
        "on disk, and recorded as removed yet still on disk",
    )


def test_vanished_a_recorded_workspace_gone_from_disk_after_its_attempt() -> None:
    w = World().serve("boot-1").task("t-1", state="failed", finished_seq=30, quiet_s=10)
    w.attempt("t-1", 1, "boot-1", finished_seq=29)
    w.workspace("t-1.1.ab", "t-1", 1, "boot-1", observed=False)
    d = only(w)
    assert (d.rule, d.action, d.evidence) == (
        "vanished_workspace",
        "remove_workspace",
        (23, 30, INV_SEQ),
    )


def test_a_vanished_workspace_of_running_work_or_of_another_root_is_left_alone() -> None:
    running = running_task(World().serve("boot-1"))
    running.workspace("t-1.1.ab", "t-1", 1, "boot-1", observed=False)
    other_root = World().serve("boot-1").task("t-1", state="failed", finished_seq=30)
    other_root.attempt("t-1", 1, "boot-1", finished_seq=29)
    other_root.workspace("t-1.1.ab", "t-1", 1, "boot-1", observed=False, root="/elsewhere/ws")
    assert found(running) == []
    assert found(other_root) == []


# --- lost_attempt --------------------------------------------------------------------------


def test_lost_an_attempt_of_a_dead_daemon_once_its_task_is_quiet() -> None:
    w = World().serve("boot-1", heartbeat_s_ago=100).task("t-1", quiet_s=61)
    w.attempt("t-1", 1, "boot-1")
    d = only(w)
    assert (d.rule, d.resource_kind, d.resource, d.action, d.error_code, d.fail_task) == (
        "lost_attempt",
        "attempt",
        "t-1/1",
        "close_attempt",
        "SUPERVISOR_LOST",
        False,
    )
    assert (d.evidence, d.since) == ((11, 21), ago(100))


def test_a_lost_attempt_waits_for_the_grace_and_for_its_container() -> None:
    quiet = World().serve("boot-1", heartbeat_s_ago=100).task("t-1", quiet_s=59)
    quiet.attempt("t-1", 1, "boot-1")
    with_container = World().serve("boot-1", heartbeat_s_ago=100).task("t-1", quiet_s=500)
    with_container.attempt("t-1", 1, "boot-1").container("c1", "t-1", 1, "boot-1")
    assert found(quiet) == []
    assert found(with_container) == [("orphan_container", "container", "c1")]


def test_lost_an_attempt_of_a_cli_run_past_its_deadline_ends_the_task_too() -> None:
    def world(deadline_in_s: float) -> World:
        w = World().run_instance("cli-1").task("t-1", quiet_s=500).attempt("t-1", 1, "cli-1")
        return w.container(
            "c1",
            "t-1",
            1,
            "cli-1",
            observed=False,
            recorded=True,
            removed_seq=80,
            deadline_in_s=deadline_in_s,
        )

    assert found(world(-9)) == []
    d = only(world(-11))
    assert (d.rule, d.error_code, d.fail_task, d.since) == (
        "lost_attempt",
        "SUPERVISOR_LOST",
        True,
        ago(11),
    )
    assert d.reason == (
        "the attempt runs on record but instance cli-1 (run) publishes no "
        "heartbeats and the attempt is past its deadline"
    )


def test_lost_an_attempt_without_any_deadline_after_the_longest_attempt() -> None:
    def world(started_s_ago: float) -> World:
        w = World().run_instance("cli-1").task("t-1", quiet_s=5000)
        return w.attempt("t-1", 1, "cli-1", started_s_ago=started_s_ago)

    assert found(world(1199)) == []
    assert found(world(1201)) == [("lost_attempt", "attempt", "t-1/1")]


def test_no_attempt_of_an_ended_task_is_closed() -> None:
    w = World().serve("boot-1", heartbeat_s_ago=100)
    w.task("t-1", state="failed", finished_seq=30, quiet_s=500).attempt("t-1", 1, "boot-1")
    assert found(w) == []


# --- deciding and planning -----------------------------------------------------------------


def test_one_divergence_per_resource_oldest_first() -> None:
    w = World().serve("boot-1").task("t-1", state="succeeded", finished_seq=30, quiet_s=50)
    w.attempt("t-1", 1, "boot-1", finished_seq=29)
    w.container("c1", "t-1", 1, "boot-1", state="exited", failed_seq=40)
    w.workspace("t-1.1.ab", "t-1", 1, "boot-1")
    assert found(w) == [
        ("leaked_workspace", "workspace", f"{ROOT}/t-1.1.ab"),  # since 50 s ago
        ("unresolved_cleanup_failure", "container", "c1"),  # since 40 s ago
    ]
    assert [name for name, _ in RULES] == [
        "unresolved_cleanup_failure",
        "overdue_container",
        "orphan_container",
        "vanished_container",
        "leaked_workspace",
        "vanished_workspace",
        "lost_attempt",
    ]


def test_command_ids_are_deterministic_and_change_with_each_final_outcome() -> None:
    first = command_id("n1", "remove_container", "c1", 0)
    assert first == command_id("n1", "remove_container", "c1", 0)
    assert first.startswith("cmd-") and len(first) == 36
    others = {
        command_id("n2", "remove_container", "c1", 0),
        command_id("n1", "remove_workspace", "c1", 0),
        command_id("n1", "remove_container", "c2", 0),
        command_id("n1", "remove_container", "c1", 1),
    }
    assert first not in others and len(others) == 4


def test_plan_marks_commands_already_decided_as_pending() -> None:
    w = World().container("c1", "t-x", 1, "?", recorded=False, created_s_ago=100)
    cid = command_id("n1", "remove_container", "c1", 0)
    assert [(p.command_id, p.pending) for p in plan(w.build(), NOW, CFG)] == [(cid, False)]
    w.open_commands.add(cid)
    assert [(p.command_id, p.pending) for p in plan(w.build(), NOW, CFG)] == [(cid, True)]
    w.open_commands.clear()
    w.finals[("remove_container", "c1")] = 1
    assert [(p.command_id, p.pending) for p in plan(w.build(), NOW, CFG)] == [
        (command_id("n1", "remove_container", "c1", 1), False)
    ]


def test_plan_leaves_a_resource_whose_command_ended_after_the_listing_began() -> None:
    # The inventory's listing began 1 s ago (see `World.build`): Docker may have listed the
    # container while the last command was removing it. The next listing decides.
    w = World().container("c1", "t-x", 1, "?", recorded=False, created_s_ago=100)
    w.finals[("remove_container", "c1")] = 1
    w.finals_at[("remove_container", "c1")] = ago(0.5)
    assert plan(w.build(), NOW, CFG) == []
    w.finals_at[("remove_container", "c1")] = ago(2)
    assert [p.command_id for p in plan(w.build(), NOW, CFG)] == [
        command_id("n1", "remove_container", "c1", 1)
    ]


def test_oldest_leak_age() -> None:
    w = World().container("c1", "t-x", 1, "?", recorded=False, created_s_ago=100)
    w.container("c2", "t-y", 1, "?", recorded=False, created_s_ago=40)
    assert oldest_leak_s(decide(w.build(), NOW, CFG), NOW) == 100.0
    assert oldest_leak_s([], NOW) == 0.0


# --- labels and names ----------------------------------------------------------------------


def test_labels_are_parsed_and_a_malformed_number_reads_as_absent() -> None:
    labels = {
        "supervisor.managed": "true",
        "supervisor.node": "n1",
        "supervisor.task": "t-1",
        "supervisor.attempt": "2",
        "supervisor.instance": "boot-1",
        "supervisor.deadline": "1767268800.5",
    }
    c = seen_container("c1", "running", 1767268700.0, labels)
    assert c == SeenContainer(
        "c1",
        "running",
        datetime(2026, 1, 1, 11, 58, 20, tzinfo=UTC),
        "t-1",
        2,
        "boot-1",
        datetime(2026, 1, 1, 12, 0, 0, 500000, tzinfo=UTC),
        True,
        "n1",
    )
    bad = seen_container(
        "c1", "exited", 0.0, {"supervisor.attempt": "x", "supervisor.deadline": "soon"}
    )
    assert (bad.attempt, bad.deadline, bad.managed, bad.node_id, bad.running) == (
        None,
        None,
        False,
        None,
        False,
    )


def test_workspace_owner_from_the_dir_name() -> None:
    assert workspace_owner("/d/workspaces/t-1.2.k3j_x") == ("t-1", 2)
    assert workspace_owner("/d/workspaces/t-1.x.k3j") == ("t-1", None)
    assert workspace_owner("/d/workspaces/stray") == (None, None)
