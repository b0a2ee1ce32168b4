"""The layout's arrows, checked on the source: `schemas` (the contract) imports nothing of
the project; `projections` (what reads) imports only `schemas`; `supervisor` (what acts)
imports `projections` only in its composition roots (`supervisor.compose`,
`supervisor.cli`); inside each package every import follows the declared order of its
parts (`tests/layout.py`); nothing of the product imports the test support (`testing`,
`tests`), and the benchmarks do not import `tests`. Every import counts, also one inside
a function or under `TYPE_CHECKING`. No folder holds more than 15 modules, and no module
passes 600 lines."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.layout import COMPOSITION_ROOTS, ORDER, reversed_arrow

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("schemas", "supervisor", "projections", "testing", "tests", "bench")


def _parse(path: Path) -> ast.Module:
    """`ast.parse` in a thread of its own: CPython 3.11's parser can refuse a file
    ("AST constructor recursion depth mismatch") in a thread whose recursion count an
    earlier test left off balance."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, path.read_text(), str(path)).result()


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import in `path`, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield node.lineno, base


def modules(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def violations(top: str, allowed: Callable[[str, str], bool]) -> list[str]:
    out = []
    for path in modules(top):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in imports(path):
            first = name.split(".")[0]
            if first in PROJECT and not allowed(rel, name):
                out.append(f"{rel}:{line} imports {name}")
    return out


def test_schemas_imports_nothing_of_the_project() -> None:
    assert violations("schemas", lambda rel, name: name.split(".")[0] == "schemas") == []


def test_projections_imports_only_schemas() -> None:
    ok = ("schemas", "projections")
    assert violations("projections", lambda rel, name: name.split(".")[0] in ok) == []


def test_supervisor_imports_projections_only_in_its_composition_root() -> None:
    def allowed(rel: str, name: str) -> bool:
        first = name.split(".")[0]
        if first == "projections":
            return rel.startswith(tuple(r.replace(".", "/") + "/" for r in COMPOSITION_ROOTS))
        return first in ("schemas", "supervisor")

    assert violations("supervisor", allowed) == []


def arrows_against_the_order(top: str) -> list[str]:
    out = []
    for path in modules(top):
        rel = path.relative_to(ROOT)
        importer = ".".join(rel.with_suffix("").parts)
        for line, name in imports(path):
            if reversed_arrow(importer, name):
                out.append(f"{rel.as_posix()}:{line} imports {name}")
    return out


def test_every_arrow_inside_a_package_follows_the_declared_order() -> None:
    for top in ORDER:
        assert arrows_against_the_order(top) == [], top


def test_every_part_of_a_package_is_declared() -> None:
    for top, order in ORDER.items():
        parts = {
            p.stem if p.is_file() else p.name
            for p in (ROOT / top).iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
        }
        assert parts == set(order), top


def test_a_reversed_arrow_is_caught() -> None:
    assert reversed_arrow("supervisor.execution.attempt", "supervisor.daemon.node")
    assert reversed_arrow("projections.store.store", "projections.serve.projector")
    assert reversed_arrow("supervisor.policy.retry", "supervisor.observability.metrics") is False
    assert reversed_arrow("supervisor.daemon.api", "supervisor.daemon.node") is False
    assert reversed_arrow("supervisor.cli.main", "projections.serve.live") is False
    assert reversed_arrow("supervisor.newpart.x", "supervisor.policy.retry")  # undeclared


def test_the_benchmarks_and_the_test_support_do_not_import_the_tests() -> None:
    for top in ("bench", "testing"):
        assert violations(top, lambda rel, name: name.split(".")[0] != "tests") == []


def test_no_folder_holds_more_than_15_modules() -> None:
    crowded = {}
    for top in ("schemas", "supervisor", "projections"):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
            if count > 15 and "__pycache__" not in folder.parts:
                crowded[folder.relative_to(ROOT).as_posix()] = count
    assert crowded == {}


def test_no_module_passes_600_lines() -> None:
    long = {}
    for top in ("schemas", "supervisor", "projections", "testing", "bench", "tests"):
        for path in modules(top):
            n = len(path.read_text().splitlines())
            if n > 600:
                long[path.relative_to(ROOT).as_posix()] = n
    assert long == {}


def test_the_architecture_page_names_every_module_and_only_modules_that_exist() -> None:
    """docs/architecture.md is written by hand (it says what each module is for): every
    module of the product is named there, and every module it names exists."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", page))
    existing = {p.name for top in ("schemas", "supervisor", "projections") for p in modules(top)}
    missing = sorted(n for n in existing - {"__init__.py", "__main__.py"} if f"`{n}`" not in page)
    assert missing == []
    assert (
        sorted(n for n in named if Path(n).name not in existing and not (ROOT / n).exists()) == []
    )
