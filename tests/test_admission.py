"""Spec decoding, bounds and policy: pure checks with exact messages."""

from __future__ import annotations

import json

import pytest

from schemas import Limits, RetryPolicy, TaskSpec
from schemas.config import Bounds, Policy
from schemas.errors import InvalidSpec, PolicyViolation
from supervisor.policy.admission import admit, decode_spec

IMG = "supervisor-sandbox:busybox"


def _spec(**kw: object) -> TaskSpec:
    return TaskSpec(image=IMG, command=["sh", "-c", "true"], **kw)  # type: ignore[arg-type]


def test_a_valid_spec_decodes_with_defaults() -> None:
    spec = decode_spec(json.dumps({"image": IMG, "command": ["true"]}))

    assert spec.priority == "normal"
    assert spec.limits == Limits()
    assert spec.network == "none"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"image": IMG, "command": ["true"], "limits": {"memory_mb": "lots"}}, "limits.memory_mb"),
        ({"image": IMG, "command": ["true"], "limits": {"timeout_s": -1}}, "limits.timeout_s"),
        ({"image": IMG, "command": ["true"], "priority": "urgent"}, "priority"),
        ({"image": IMG, "command": ["true"], "colour": "red"}, "colour"),
        ({"image": IMG}, "spec"),
        ({"image": IMG, "command": ["true"], "task_id": "has.dot"}, "task_id"),
    ],
)
def test_a_malformed_spec_names_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        decode_spec(json.dumps(doc))

    assert e.value.field == field
    assert e.value.tag == "invalid_spec"


def test_bad_json_is_invalid_spec() -> None:
    with pytest.raises(InvalidSpec) as e:
        decode_spec(b"{not json")

    assert e.value.field == "spec"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_spec(limits=Limits(timeout_s=601)), "limits.timeout_s"),
        (_spec(limits=Limits(memory_mb=5000)), "limits.memory_mb"),
        (_spec(files={"../escape.sh": "x"}), "files.../escape.sh"),
        (_spec(files={"/etc/passwd": "x"}), "files./etc/passwd"),
        (_spec(env={"BAD-KEY": "1"}), "env.BAD-KEY"),
        (TaskSpec(image=IMG, command=[]), "command"),
        (TaskSpec(image=" ", command=["true"]), "image"),
    ],
)
def test_bounds_refuse_with_the_field(spec: TaskSpec, field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        admit(spec, Bounds(), Policy())

    assert e.value.field == field


@pytest.mark.parametrize(
    ("spec", "request_name"),
    [
        (_spec(privileged=True), "privileged"),
        (_spec(cap_add=["SYS_ADMIN"]), "cap_add"),
        (_spec(network="host"), "network"),
        (_spec(network="bridge"), "network"),
        (_spec(mounts=[{"source": "/", "target": "/host"}]), "mounts"),
    ],
)
def test_each_forbidden_security_request_is_a_policy_violation(
    spec: TaskSpec, request_name: str
) -> None:
    with pytest.raises(PolicyViolation) as e:
        admit(spec, Bounds(), Policy())

    assert e.value.request == request_name


def test_policy_can_allow_what_it_forbids_by_default() -> None:
    policy = Policy(allowed_capabilities=["NET_BIND_SERVICE"], allowed_networks=["none", "bridge"])

    assert (
        admit(_spec(cap_add=["net_bind_service"], network="bridge"), Bounds(), policy).network
        == "bridge"
    )


@pytest.mark.parametrize(
    "image",
    [
        "UPPER/Case:bad",
        "-v /:/host",
        "busybox:",
        "a//b",
        "busybox:-x",
        "repo/",
        ":tag",
        "busybox@sha256:short",
        "x" * 256,
    ],
)
def test_an_image_that_is_no_reference_is_an_invalid_spec_naming_the_image(image: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        admit(TaskSpec(image=image, command=["true"]), Bounds(), Policy())

    assert e.value.field == "image"


@pytest.mark.parametrize(
    "image",
    [
        "supervisor-sandbox:busybox",
        "busybox",
        "library/busybox:1.36",
        "localhost:5000/a/b:c",
        "Registry.Example.com/team/app:v1.2-rc_3",
        "a__b/c-d.e",
        "busybox@sha256:" + "a" * 64,
    ],
)
def test_image_references_of_every_form_are_admitted(image: str) -> None:
    assert admit(TaskSpec(image=image, command=["true"]), Bounds(), Policy()).image == image


@pytest.mark.parametrize(
    ("files", "field"),
    [
        ({".": "x"}, "files.."),
        ({"a//b": "x"}, "files.a//b"),
        ({"./x": "x"}, "files../x"),
        ({"x/": "x"}, "files.x/"),
        ({"": "x"}, "files."),
        ({"main.sh": "x", "main.sh/inner": "y"}, "files.main.sh/inner"),
        ({"a\nb": "x"}, "files.'a\\nb'"),
        ({"evil\u202egnp.sh": "x"}, "files.'evil\\u202egnp.sh'"),
        ({"bell\x07": "x"}, "files.'bell\\x07'"),
    ],
)
def test_file_names_that_are_no_plain_relative_path_are_refused(
    files: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidSpec) as e:
        admit(_spec(files=files), Bounds(), Policy())

    assert e.value.field == field


def test_env_names_of_the_supervisors_own_are_refused() -> None:
    with pytest.raises(InvalidSpec) as e:
        admit(_spec(env={"SUPERVISOR_TASK_ID": "forged"}), Bounds(), Policy())

    assert e.value.field == "env.SUPERVISOR_TASK_ID"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"files": {"x" * 5000: "a"}}, "files."),
        ({"files": {"/".join(["d"] * 2000) + "/f": "a"}}, "files."),
        ({"files": {"/".join(["d"] * 40): "a"}}, "files."),
        ({"files": {"big": "a" * (16 * 1024 * 1024)}}, "files"),
        ({"stdin": "a" * (16 * 1024 * 1024)}, "stdin"),
        ({"retry": RetryPolicy(base_delay_s=100000)}, "retry.base_delay_s"),
        ({"retry": RetryPolicy(max_delay_s=1e308)}, "retry.max_delay_s"),
    ],
)
def test_what_the_event_log_or_the_host_cannot_carry_is_refused_at_admission(
    kw: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidSpec) as e:
        admit(_spec(**kw), Bounds(), Policy())

    assert e.value.field.startswith(field)
    assert len(e.value.field) <= len(field) + 66  # a long name is cut in the message


def test_a_spec_too_big_for_one_event_is_refused_whole() -> None:
    four_mib = 4 * 1024 * 1024
    spec = _spec(files={"a": "x" * (four_mib - 10)}, stdin="y" * (four_mib - 10))

    with pytest.raises(InvalidSpec) as e:
        admit(spec, Bounds(), Policy())

    assert e.value.field == "spec"
    assert "above the configured bound 6291456" in str(e.value)
