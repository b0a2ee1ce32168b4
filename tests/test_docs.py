"""The documentation stays true to the code: the configuration reference is the one the
config Structs generate, every key has a meaning, the README stays short and every link
in the docs resolves inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from schemas.catalogue import CATALOGUE, GENERATED, with_tables
from schemas.config import Config, reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_configuration_reference_is_generated_from_the_structs() -> None:
    assert (ROOT / "docs/configuration.md").read_text() == reference(), (
        "docs/configuration.md is stale: .venv/bin/python -m schemas.config > docs/configuration.md"
    )


def test_the_error_catalogue_tables_are_generated_from_the_catalogue() -> None:
    for name in GENERATED:
        text = (ROOT / name).read_text()
        assert text == with_tables(name, text), (
            f"{name}: the catalogue table is stale: .venv/bin/python -m schemas.catalogue"
        )
        assert all(code in text for code in CATALOGUE)


def test_every_configuration_key_has_a_meaning() -> None:
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert rows and all(not line.endswith("|  |") for line in rows), rows
    info = msgspec.inspect.type_info(Config)
    assert isinstance(info, msgspec.inspect.StructType)
    count = sum(
        len(f.type.fields) if isinstance(f.type, msgspec.inspect.StructType) else 1
        for f in info.fields
    )
    assert len(rows) == count


def test_the_readme_is_short_and_every_link_resolves_inside_the_repository() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_benchmarks_are_one_table_with_one_row_each() -> None:
    """docs/benchmarks.md: every row in the one table (none strayed below the prose), each
    with its four cells, a command that runs a file of `bench/`, and a date."""
    lines = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    assert rows == list(range(rows[0], rows[0] + len(rows)))
    for i in rows[2:]:
        cells = [c.strip() for c in lines[i].strip("|").split(" | ")]
        assert len(cells) == 4, lines[i]
        command, date = cells[1], cells[3]
        scripts = re.findall(r"bench/(\w+\.py)", command)
        assert command == "same" or scripts, lines[i]
        assert all((ROOT / "bench" / s).is_file() for s in scripts), lines[i]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), lines[i]


def test_the_changelog_has_each_heading_once_per_release() -> None:
    release: list[str] = []
    for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
        if line.startswith("## "):
            release = []
        elif line.startswith("### "):
            assert line not in release, line
            release.append(line)
