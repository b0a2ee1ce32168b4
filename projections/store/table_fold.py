"""The Python fold of a current-state table, made from its declaration
(`projections.store.rules`): the new row of one key from its stored row and its events of
the batch. Pure: no I/O. See `projections.store.rules` for what each rule means; the
set-based twin is `projections.store.merge`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from projections.store.rules import (
    NO_CTX,
    Coalesce,
    Col,
    Cond,
    Const,
    Count,
    Ctx,
    Derived,
    Event,
    Expr,
    FirstSet,
    Group,
    Hidden,
    Key,
    Last,
    LastSet,
    Look,
    Make,
    Old,
    Owner,
    Row,
    Table,
    Take,
    Val,
    owners,
)


def _first_match(ev: list[Event], where: Cond | None, ctx: Ctx) -> Event | None:
    return next((e for e in ev if where is None or where.py(e, ctx)), None)


def _last_match(ev: list[Event], where: Cond | None, ctx: Ctx) -> Event | None:
    return next((e for e in reversed(ev) if where is None or where.py(e, ctx)), None)


def _non_null(ev: Iterable[Event], where: Cond | None, val: Val, ctx: Ctx) -> Any:
    for e in ev:
        if where is None or where.py(e, ctx):
            value = val.py(e)
            if value is not None:
                return value
    return None


def _eval(expr: Expr, row: Row, old: Row, hidden: Row) -> Any:
    if isinstance(expr, Col):
        return row[expr.name]
    if isinstance(expr, Old):
        return old.get(expr.name)
    if isinstance(expr, Hidden):
        return hidden[expr.name]
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Coalesce):
        return next((v for x in expr.exprs if (v := _eval(x, row, old, hidden)) is not None), None)
    return next((s for s, c in reversed(expr.steps) if row[c] is not None), None)


Step = Callable[["_Key"], Any]
"""How one column's new value is computed for one key."""


class _Key:
    """One key's fold in progress: its stored row, its events, the context of its
    conditions, and each group's event, found once however many columns take from it."""

    __slots__ = ("ctx", "ev", "key", "matched", "oo")

    def __init__(self, key: tuple[Any, ...], oo: Row, ev: list[Event], ctx: Ctx) -> None:
        self.key, self.oo, self.ev, self.ctx = key, oo, ev, ctx
        self.matched: dict[str, Event | None] = {}

    def match(self, g: Group) -> Event | None:
        if g.name not in self.matched:
            find = _last_match if g.latest else _first_match
            self.matched[g.name] = find(self.ev, g.where, self.ctx)
        return self.matched[g.name]


def _step(t: Table, col: str, make: Make) -> Step:
    """The column's rule as a function of one key's fold."""
    if isinstance(make, Key):
        i = t.keys.index(col)
        return lambda k: k.key[i]
    if isinstance(make, Owner):
        return lambda k: k.ctx.owner[col]
    if isinstance(make, Take):
        g, val = make.group, make.val
        if g.latest:

            def latest(k: _Key) -> Any:
                m = k.match(g)
                return k.oo.get(col) if m is None else val.py(m)

            return latest
        guard = g.guard

        def first(k: _Key) -> Any:
            if guard is not None and k.oo.get(guard) is not None:
                return k.oo[col]
            m = k.match(g)
            return None if m is None else val.py(m)

        return first
    if isinstance(make, FirstSet):
        where, val = make.where, make.val

        def first_set(k: _Key) -> Any:
            stored = k.oo.get(col)
            return stored if stored is not None else _non_null(k.ev, where, val, k.ctx)

        return first_set
    if isinstance(make, LastSet):
        where, val, keep = make.where, make.val, make.stored

        def last_set(k: _Key) -> Any:
            value = _non_null(reversed(k.ev), where, val, k.ctx)
            return value if value is not None or not keep else k.oo.get(col)

        return last_set
    if isinstance(make, Count):
        where_ = make.where
        if where_ is None:
            return lambda k: (k.oo.get(col) or 0) + len(k.ev)
        return lambda k: (k.oo.get(col) or 0) + sum(1 for e in k.ev if where_.py(e, k.ctx))
    if isinstance(make, Last):
        val_ = make.val
        return lambda k: _non_null(reversed(k.ev), None, val_, k.ctx)
    raise TypeError(f"{t.name}.{col}: {make!r} is computed over the other columns")


def select(t: Table, events: Iterable[Event]) -> dict[Any, list[Event]]:
    """The events of each key of `t`, in stream order (`events` is); a one-column key is
    the value itself, a longer one a tuple."""
    out: dict[Any, list[Event]] = {}
    for e in events:
        for cond, vals in t.sources:
            if cond is None or cond.py(e, NO_CTX):
                key = vals[0].py(e) if len(vals) == 1 else tuple(v.py(e) for v in vals)
                if key is not None:
                    out.setdefault(key, []).append(e)
                break
    return out


Folder = Callable[[Any, "Row | None", list[Event], Look], Row]


def folder(t: Table) -> Folder:
    """The Python fold of `t`: the new row of a key from its stored row (None if new), its
    events of the batch in stream order, and the looked-up rows."""
    owner_fields = owners(t)
    steps = [(c, _step(t, c, m)) for c, m in (*t.columns, *t.hidden) if not isinstance(m, Derived)]
    derived = [(c, m.expr) for c, m in t.columns if isinstance(m, Derived)]
    hidden_names = [c for c, _ in t.hidden]
    names = [c for c, _ in t.columns]
    single = len(t.keys) == 1

    def fold(key: Any, o: Row | None, ev: list[Event], look: Look) -> Row:
        oo: Row = o or {}
        first = ev[0]
        owner = {c: (oo[c] if o is not None else first.get(f)) for c, f in owner_fields.items()}
        k = _Key((key,) if single else tuple(key), oo, ev, Ctx(owner, look))
        values = {c: step(k) for c, step in steps}
        hidden = {c: values.pop(c) for c in hidden_names}
        for c, expr in derived:
            values[c] = _eval(expr, values, oo, hidden)
        return {c: values[c] for c in names}

    return fold
