"""The set-based `MERGE` of a current-state table, made from its declaration
(`projections.store.rules`). Pure: text only. See `projections.store.rules` for what each
rule means; the Python twin is `projections.store.table_fold`.

The statement reads `_new` (the batch's new envelopes) and the staging tables of the kinds
the table needs, one row per event of a kind keyed by `seq`; each event has one kind, so a
field that several kinds carry is the `coalesce` of theirs. Its CTEs, in order:

- `e0`, `e`: one row per event of the table, with the fields its rules read and its key
  (`_k0`, `_k1`, ...);
- `f`, `j`: only where a condition reads the key's owner or a looked-up row: each event
  with those values;
- `d`: one row per key, every aggregate the rules need (a group is one struct);
- `r`: the stored columns, from the aggregates and the stored row; the final SELECT adds
  the derived ones.
"""

from __future__ import annotations

from projections.store.rules import (
    ENVELOPE,
    Coalesce,
    Col,
    Cond,
    Const,
    Count,
    Derived,
    Expr,
    FirstSet,
    Hidden,
    IsKind,
    Key,
    Last,
    LastSet,
    Looked,
    Make,
    Old,
    Owner,
    OwnerOf,
    Table,
    Take,
    cond_args,
    cond_fields,
    conditions,
    expr_refs,
    groups,
    owners,
    sql_text,
    values_read,
    walk,
)


def _field_sql(name: str, kinds: dict[str, tuple[str, ...]]) -> str:
    if name in ENVELOPE:
        return f"n.{name}"
    having = [k for k, names in kinds.items() if name in names]
    if not having:
        raise ValueError(f"no staging kind of {sorted(kinds)} has the field {name!r}")
    parts = [f"_{k}.{name}" for k in having]
    return parts[0] if len(parts) == 1 else f"coalesce({', '.join(parts)})"


def _filter(where: Cond | None, extra: str = "") -> str:
    terms = [t for t in ((where.sql() if where is not None else ""), extra) if t]
    return f" FILTER (WHERE {' AND '.join(terms)})" if terms else ""


def _expr_sql(expr: Expr) -> str:
    if isinstance(expr, Col):
        return expr.name
    if isinstance(expr, Old):
        return f"_old_{expr.name}"
    if isinstance(expr, Hidden):
        return f"_h_{expr.name}"
    if isinstance(expr, Const):
        return sql_text(expr.value)
    if isinstance(expr, Coalesce):
        return f"coalesce({', '.join(_expr_sql(x) for x in expr.exprs)})"
    arms = " ".join(f"WHEN {c} IS NOT NULL THEN {sql_text(s)}" for s, c in reversed(expr.steps))
    return f"CASE {arms} END"


def _key_cols(t: Table) -> list[str]:
    return [f"_k{i}" for i in range(len(t.keys))]


def _on_stored(t: Table, side: str) -> str:
    """The stored row `o` of the key `side._k0, ...`."""
    return " AND ".join(f"o.{k} = {side}.{kc}" for k, kc in zip(t.keys, _key_cols(t), strict=True))


def _owner_struct(t: Table) -> str:
    return "{" + ", ".join(f"'{col}': {name}" for col, name in owners(t).items()) + "}"


def _events(t: Table, staging: dict[str, tuple[str, ...]]) -> list[str]:
    """`e0`, `e`: one row per event of the table, the fields its rules read, its key."""
    conds = [*conditions(t), *(c for c, _ in t.sources)]
    if t.lookup is not None:
        conds.append(t.lookup.when)
    fields = {"seq"} | set(owners(t).values())
    for cond in conds:
        fields |= cond_fields(cond)
    for val in values_read(t):
        fields |= val.fields()
    flagged = {c.kind for cond in conds for c in walk(cond) if isinstance(c, IsKind)}
    if not flagged <= set(t.kinds):
        raise ValueError(f"{t.name}: conditions name kinds {flagged} beyond {t.kinds}")
    kinds = {k: staging[k] for k in t.kinds}
    select = [f"{_field_sql(f, kinds)} AS {f}" for f in sorted(fields)]
    select += [f"_{k}.seq IS NOT NULL AS _is_{k}" for k in sorted(flagged)]
    joins = "".join(f"\n        LEFT JOIN _{k} ON _{k}.seq = n.seq" for k in kinds)
    keys = [
        "CASE "
        + " ".join(
            f"WHEN {cond.sql() if cond is not None else 'true'} THEN {vals[i].sql()}"
            for cond, vals in t.sources
        )
        + f" END AS {kc}"
        for i, kc in enumerate(_key_cols(t))
    ]
    return [
        f"e0 AS (\n        SELECT {', '.join(select)}\n        FROM _new n{joins}\n    )",
        f"e AS (\n        SELECT * FROM (SELECT *, {', '.join(keys)} FROM e0)"
        f" WHERE _k0 IS NOT NULL\n    )",
    ]


def _joined(t: Table) -> list[str]:
    """`f`, `j`: where a condition reads the key's owner or a looked-up row, each event
    with those values (`_owner_<col>`, `_look_<col>`); none where no condition does."""
    args = set().union(*(cond_args(c) for c in conditions(t)))
    owned = sorted(a.name for a in args if isinstance(a, OwnerOf))
    looked = sorted(a.name for a in args if isinstance(a, Looked))
    if not owned and not looked:
        return []
    by = ", ".join(_key_cols(t))
    fields = owners(t)
    extra = [
        f"CASE WHEN o.{t.keys[0]} IS NOT NULL THEN o.{c} ELSE f._first.{fields[c]} END"
        f" AS _owner_{c}"
        for c in owned
    ] + [f"l.{c} AS _look_{c}" for c in looked]
    ctes, joins = [], ""
    if owned:
        ctes.append(
            f"f AS (SELECT {by}, arg_min({_owner_struct(t)}, seq) AS _first FROM e GROUP BY {by})"
        )
        joins += f" JOIN f USING ({by}) LEFT JOIN {t.name} o ON {_on_stored(t, 'e')}"
    if looked:
        lk = t.lookup
        if lk is None:
            raise ValueError(f"{t.name}: a condition reads a looked-up row, but none is declared")
        on = " AND ".join(f"l.{c} = {v.sql('e.')}" for c, v in lk.on)
        joins += f" LEFT JOIN {lk.table} l ON {on} AND {lk.when.sql('e.')}"
    ctes.append(f"j AS (SELECT e.*, {', '.join(extra)} FROM e{joins})")
    return ctes


def _aggregates(t: Table) -> list[str]:
    """The aggregates of `d`, one row per key: `_first` (the owner columns' first event),
    `_g_<group>` (a group's event, as one struct), `_a_<column>` (one column's)."""
    made = (*t.columns, *t.hidden)
    aggs = [f"arg_min({_owner_struct(t)}, seq) AS _first"] if owners(t) else []
    for g in groups(t):
        taken = [(col, m.val) for col, m in made if isinstance(m, Take) and m.group == g]
        struct = "{'_seq': seq, " + ", ".join(f"'{col}': {v.sql()}" for col, v in taken) + "}"
        fn = "arg_max" if g.latest else "arg_min"
        aggs.append(f"{fn}({struct}, seq){_filter(g.where)} AS _g_{g.name}")
    for col, make in made:
        if isinstance(make, FirstSet | LastSet | Last):
            fn = "arg_min" if isinstance(make, FirstSet) else "arg_max"
            where = None if isinstance(make, Last) else make.where
            v = make.val.sql()
            aggs.append(f"{fn}({v}, seq){_filter(where, f'{v} IS NOT NULL')} AS _a_{col}")
        elif isinstance(make, Count):
            aggs.append(f"count(*){_filter(make.where)} AS _a_{col}")
    return aggs


def _stored_column(t: Table, col: str, make: Make) -> str:
    """A column of `r`: the new value, from `d` and the stored row `o`."""
    if isinstance(make, Key):
        return f"d._k{t.keys.index(col)}"
    if isinstance(make, Owner):
        return (
            f"CASE WHEN o.{t.keys[0]} IS NOT NULL THEN o.{col} ELSE d._first.{owners(t)[col]} END"
        )
    if isinstance(make, Take):
        g = f"d._g_{make.group.name}"
        if make.group.latest:
            return f"CASE WHEN {g}._seq IS NOT NULL THEN {g}.{col} ELSE o.{col} END"
        return f"CASE WHEN o.{make.group.guard} IS NOT NULL THEN o.{col} ELSE {g}.{col} END"
    if isinstance(make, FirstSet):
        return f"coalesce(o.{col}, d._a_{col})"
    if isinstance(make, LastSet):
        return f"coalesce(d._a_{col}, o.{col})" if make.stored else f"d._a_{col}"
    if isinstance(make, Count):
        return f"coalesce(o.{col}, 0) + d._a_{col}"
    if isinstance(make, Last):
        return f"d._a_{col}"
    raise TypeError(f"{t.name}.{col}: {make!r} is computed over the others")


def merge_sql(t: Table, staging: dict[str, tuple[str, ...]]) -> str:
    """The `MERGE INTO` of `t` over `_new` and the staging tables, whose fields by kind
    `staging` gives (the envelope's excepted)."""
    ctes = [*_events(t, staging), *_joined(t)]
    source = "j" if ctes[-1].startswith("j AS") else "e"
    by = ", ".join(_key_cols(t))
    ctes.append(
        f"d AS (\n        SELECT {by}, {', '.join(_aggregates(t))}\n"
        f"        FROM {source} GROUP BY {by}\n    )"
    )
    derived = [(col, m.expr) for col, m in t.columns if isinstance(m, Derived)]
    olds = sorted(set().union(set(), *(expr_refs(x, Old) for _, x in derived)))
    cols = [
        f"{_stored_column(t, col, m)} AS {col}"
        for col, m in t.columns
        if not isinstance(m, Derived)
    ]
    cols += [f"{_stored_column(t, col, m)} AS _h_{col}" for col, m in t.hidden]
    cols += [f"o.{col} AS _old_{col}" for col in olds]
    ctes.append(
        f"r AS (\n        SELECT {', '.join(cols)}\n"
        f"        FROM d LEFT JOIN {t.name} o ON {_on_stored(t, 'd')}\n    )"
    )
    final = [
        f"{_expr_sql(m.expr)} AS {col}" if isinstance(m, Derived) else col for col, m in t.columns
    ]
    on_src = " AND ".join(f"src.{k} = {t.name}.{k}" for k in t.keys)
    return (
        f"MERGE INTO {t.name} USING (\n    WITH {', '.join(ctes)}\n"
        f"    SELECT {', '.join(final)} FROM r\n) AS src ON {on_src}\n"
        "WHEN MATCHED THEN UPDATE\nWHEN NOT MATCHED THEN INSERT\n"
    )
