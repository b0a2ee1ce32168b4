"""How a current-state table is declared, and the two things made from one declaration.
Pure: no I/O.

A current-state table (tasks, attempts, containers, workspaces, instances) is one row per
key, folded from the events of that key in stream order. Its declaration (`Table`, written
in `projections.store.current`) says, per column, which of a few rules makes it:

- `Key`: the row's key, read off each event by the table's `sources`;
- `Owner`: the stored row's value, or else the key's first event's;
- `Take` of a `Group`: a set of columns taken together from one event, the first one
  matching the group's condition (kept from the stored row once its `guard` column is
  set) or, for a `latest` group, the last one (the stored row's while none matches);
- `FirstSet` / `LastSet`: the first / last non-null value among the matching events (the
  stored value wins for `FirstSet`; for `LastSet` it stands in while the batch has none);
- `Count`: the stored count plus the matching events;
- `Last`: the last event's value;
- `Derived`: an expression (`Expr`) over the new row's other columns.

From one declaration, `projections.store.merge.merge_sql` writes the set-based `MERGE` a
large batch runs, and `projections.store.table_fold.folder` the Python function a small batch
runs for each key. Both read the same conditions and values (`Cond`, `Val`), which hold
their Python and SQL forms side by side; where a rule of the lifecycle needs more than
these (who may finish an attempt), `Rule` pairs the two forms that
`projections.store.machine` writes next to each other. `tests/test_fold.py` projects random
histories both ways, cut anywhere, and compares every row.

A value is read only under a condition that fixes the event's kind (or from the envelope):
the SQL takes a field from the table's declared `kinds` alone, while the Python reads the
event's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

Event = dict[str, Any]
Row = dict[str, Any]
Look = Callable[[Event], "Row | None"]
"""The looked-up row (`Table.lookup`) an event names, or None."""

ENVELOPE: Final[tuple[str, ...]] = (
    "seq",
    "type",
    "event_id",
    "occurred_at",
    "node_id",
    "instance_id",
    "task_id",
    "attempt",
    "correlation_id",
    "schema_version",
    "proof",
)
"""The envelope fields every event has (the columns of `_new`)."""


def sql_text(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _sql_list(values: Iterable[str]) -> str:
    return "(" + ", ".join(sql_text(v) for v in values) + ")"


# --- what is read of one event ------------------------------------------------------------


@dataclass(frozen=True)
class F:
    """An event's field."""

    name: str

    def py(self, e: Event) -> Any:
        return e.get(self.name)

    def sql(self, p: str = "") -> str:
        return p + self.name

    def fields(self) -> frozenset[str]:
        return frozenset((self.name,))


@dataclass(frozen=True)
class Fn:
    """A function of an event's field, in its two forms (`sql` maps the field's SQL)."""

    name: str
    py_fn: Callable[[Any], Any] = field(compare=False)
    sql_fn: Callable[[str], str] = field(compare=False)

    def py(self, e: Event) -> Any:
        value = e.get(self.name)
        return None if value is None else self.py_fn(value)

    def sql(self, p: str = "") -> str:
        return self.sql_fn(p + self.name)

    def fields(self) -> frozenset[str]:
        return frozenset((self.name,))


Val = F | Fn


@dataclass(frozen=True)
class Ctx:
    """What a condition may read besides the event: the key's owner columns (`Owner`)
    and the looked-up row."""

    owner: Row
    look: Look


NO_CTX: Final = Ctx({}, lambda e: None)


@dataclass(frozen=True)
class IsType:
    types: tuple[str, ...]
    negate: bool = False

    def py(self, e: Event, ctx: Ctx) -> bool:
        return (e["type"] in self.types) != self.negate

    def sql(self, p: str = "") -> str:
        return f"{p}type {'NOT IN' if self.negate else 'IN'} {_sql_list(self.types)}"


def is_type(*types: str) -> IsType:
    return IsType(types)


def not_type(*types: str) -> IsType:
    return IsType(types, negate=True)


@dataclass(frozen=True)
class IsKind:
    """The event's staging kind is `kind` (its body has a row in `_<kind>`)."""

    kind: str

    def py(self, e: Event, ctx: Ctx) -> bool:
        return bool(e.get("_kind") == self.kind)

    def sql(self, p: str = "") -> str:
        return f"{p}_is_{self.kind}"


@dataclass(frozen=True)
class FieldIn:
    name: str
    values: tuple[str, ...]
    negate: bool = False

    def py(self, e: Event, ctx: Ctx) -> bool:
        value = e.get(self.name)
        return value is not None and (value in self.values) != self.negate

    def sql(self, p: str = "") -> str:
        op = "NOT IN" if self.negate else "IN"
        return f"coalesce({p}{self.name} {op} {_sql_list(self.values)}, false)"


@dataclass(frozen=True)
class Category:
    """The first token of the event's type is one of `categories`."""

    categories: tuple[str, ...]

    def py(self, e: Event, ctx: Ctx) -> bool:
        return str(e["type"]).split(".", 1)[0] in self.categories

    def sql(self, p: str = "") -> str:
        return f"split_part({p}type, '.', 1) IN {_sql_list(self.categories)}"


@dataclass(frozen=True)
class Positive:
    name: str

    def py(self, e: Event, ctx: Ctx) -> bool:
        value = e.get(self.name)
        return value is not None and value > 0

    def sql(self, p: str = "") -> str:
        return f"coalesce({p}{self.name} > 0, false)"


@dataclass(frozen=True)
class Ev:
    """A `Rule` argument: the event's field."""

    name: str


@dataclass(frozen=True)
class OwnerOf:
    """A `Rule` argument: the key's `Owner` column of that name (as it will be stored)."""

    name: str


@dataclass(frozen=True)
class Looked:
    """A `Rule` argument: a column of the looked-up row (None when there is none)."""

    name: str


Arg = Ev | OwnerOf | Looked


@dataclass(frozen=True)
class Rule:
    """A rule of the lifecycle in its two forms, written side by side where it is defined
    (`projections.store.machine`): `py_fn` takes the arguments' values, `sql_fn` their
    SQL expressions."""

    py_fn: Callable[..., bool] = field(compare=False)
    sql_fn: Callable[..., str] = field(compare=False)
    args: tuple[Arg, ...]

    def py(self, e: Event, ctx: Ctx) -> bool:
        values = []
        for a in self.args:
            if isinstance(a, Ev):
                values.append(e.get(a.name))
            elif isinstance(a, OwnerOf):
                values.append(ctx.owner[a.name])
            else:
                looked = ctx.look(e)
                values.append(None if looked is None else looked[a.name])
        return self.py_fn(*values)

    def sql(self, p: str = "") -> str:
        return self.sql_fn(*(_arg_sql(a, p) for a in self.args))


def _arg_sql(a: Arg, p: str) -> str:
    if isinstance(a, Ev):
        return p + a.name
    return f"_owner_{a.name}" if isinstance(a, OwnerOf) else f"_look_{a.name}"


@dataclass(frozen=True)
class All:
    conds: tuple[Cond, ...]

    def py(self, e: Event, ctx: Ctx) -> bool:
        return all(c.py(e, ctx) for c in self.conds)

    def sql(self, p: str = "") -> str:
        return "(" + " AND ".join(c.sql(p) for c in self.conds) + ")"


def all_of(*conds: Cond) -> All:
    return All(conds)


Cond = IsType | IsKind | FieldIn | Category | Positive | Rule | All


def walk(cond: Cond | None) -> Iterable[Cond]:
    if cond is None:
        return
    yield cond
    if isinstance(cond, All):
        for c in cond.conds:
            yield from walk(c)


def cond_fields(cond: Cond | None) -> set[str]:
    out: set[str] = set()
    for c in walk(cond):
        if isinstance(c, IsType | Category):
            out.add("type")
        elif isinstance(c, FieldIn | Positive):
            out.add(c.name)
        elif isinstance(c, Rule):
            out.update(a.name for a in c.args if isinstance(a, Ev))
    return out


def cond_args(cond: Cond | None) -> set[Arg]:
    return {a for c in walk(cond) if isinstance(c, Rule) for a in c.args}


# --- how a column is made ----------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A key column; its value is read off each event by `Table.sources`."""


@dataclass(frozen=True)
class Owner:
    """The stored row's value, or else the key's first event's `name` (the column's own
    name by default)."""

    name: str | None = None


@dataclass(frozen=True)
class Group:
    """Columns taken together from one event: the first that matches `where`, kept once
    the stored row's `guard` column is set; or, `latest`, the last that matches (the
    stored row's values while none does)."""

    name: str
    where: Cond
    guard: str | None = None
    latest: bool = False


@dataclass(frozen=True)
class Take:
    group: Group
    val: Val


@dataclass(frozen=True)
class FirstSet:
    where: Cond | None
    val: Val


@dataclass(frozen=True)
class LastSet:
    where: Cond | None
    val: Val
    stored: bool = True
    """Whether the stored value stands in while the batch has none."""


@dataclass(frozen=True)
class Count:
    where: Cond | None = None


@dataclass(frozen=True)
class Last:
    val: Val


# Expressions of `Derived` columns, over the new row.


@dataclass(frozen=True)
class Col:
    """The new row's column."""

    name: str


@dataclass(frozen=True)
class Old:
    """The stored row's column (None for a new key)."""

    name: str


@dataclass(frozen=True)
class Hidden:
    """A value the table computes without storing it (`Table.hidden`)."""

    name: str


@dataclass(frozen=True)
class Const:
    value: str


@dataclass(frozen=True)
class Coalesce:
    exprs: tuple[Expr, ...]


@dataclass(frozen=True)
class Furthest:
    """The furthest state whose column is set: `steps` lists (state, column) from the
    first step to the last."""

    steps: tuple[tuple[str, str], ...]


Expr = Col | Old | Hidden | Const | Coalesce | Furthest


@dataclass(frozen=True)
class Derived:
    expr: Expr


Make = Key | Owner | Take | FirstSet | LastSet | Count | Last | Derived


@dataclass(frozen=True)
class Lookup:
    """Another current-state table's row that conditions read (`Looked`): the row of
    `table` whose `on` columns equal the event's values, for the events matching `when`.
    That table is folded or merged first."""

    table: str
    on: tuple[tuple[str, Val], ...]
    when: Cond


@dataclass(frozen=True)
class Table:
    """A current-state table: its columns in the order of its DDL, how each is made, and
    which events touch which key (`sources`: the first whose condition matches, or None
    for every event, gives the key, one value per key column; an event none matches is not
    the table's).
    `reads`: the inputs of `projections.store.apply.steps_for` that can touch it."""

    name: str
    keys: tuple[str, ...]
    sources: tuple[tuple[Cond | None, tuple[Val, ...]], ...]
    columns: tuple[tuple[str, Make], ...]
    reads: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    """The staging kinds whose bodies the rules read (every field not of the envelope comes
    from one of them)."""
    hidden: tuple[tuple[str, Make], ...] = ()
    lookup: Lookup | None = None

    def __post_init__(self) -> None:
        names = [c for c, _ in self.columns]
        if [c for c, m in self.columns if isinstance(m, Key)] != list(self.keys):
            raise ValueError(f"{self.name}: key columns {self.keys} are not its Key columns")
        for col, make in self.columns:
            if isinstance(make, Take) and make.group.guard not in (None, *names):
                raise ValueError(f"{self.name}.{col}: guard {make.group.guard} is no column")
        for cond, vals in self.sources:
            if cond_args(cond) or len(vals) != len(self.keys):
                raise ValueError(f"{self.name}: a source reads only the event, one value a key")


def groups(t: Table) -> list[Group]:
    seen: dict[str, Group] = {}
    for _, make in (*t.columns, *t.hidden):
        if isinstance(make, Take):
            seen.setdefault(make.group.name, make.group)
    return list(seen.values())


def owners(t: Table) -> dict[str, str]:
    """Owner column -> the event field it is read from."""
    return {c: (m.name or c) for c, m in t.columns if isinstance(m, Owner)}


def conditions(t: Table) -> list[Cond | None]:
    out: list[Cond | None] = [g.where for g in groups(t)]
    for _, make in (*t.columns, *t.hidden):
        if isinstance(make, FirstSet | LastSet | Count):
            out.append(make.where)
    return out


def values_read(t: Table) -> list[Val]:
    out: list[Val] = []
    for _, make in (*t.columns, *t.hidden):
        if isinstance(make, Take | FirstSet | LastSet | Last):
            out.append(make.val)
    for _, vals in t.sources:
        out.extend(vals)
    if t.lookup is not None:
        out.extend(v for _, v in t.lookup.on)
    return out


def expr_refs(expr: Expr, kind: type) -> set[str]:
    if isinstance(expr, Coalesce):
        return set().union(*(expr_refs(x, kind) for x in expr.exprs))
    if isinstance(expr, Furthest):
        return {c for _, c in expr.steps} if kind is Col else set()
    return {expr.name} if isinstance(expr, kind) and not isinstance(expr, Const) else set()
