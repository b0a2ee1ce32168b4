"""requirements.lock against pyproject.toml and this environment: every dependency (with
the dev extra) is locked at a version its requirement allows, and what is installed is
what the lock says (scripts/setup installs from it; scripts/lock remakes it)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _required() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    ]


def test_every_dependency_is_locked_at_a_version_it_allows() -> None:
    pins = _locked()
    for req in _required():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run scripts/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {req.name}=={pins[name]}, pyproject.toml wants {req}: "
            "run scripts/lock"
        )


def test_the_environment_is_the_lock() -> None:
    for name, version in _locked().items():
        assert importlib.metadata.version(name) == version, name
