"""The read side: the projector (SUP_EVENTS -> DuckDB), the tables and views, replay,
the lifecycle audit and read-only SQL. It imports only the contract (`schemas`). Its parts,
in the order data flows (each imports only those before it; docs/architecture.md):

- `projections.errors`: the read side's branch of the exception tree;
- `projections.stream`: reading `SUP_EVENTS` and decoding events into staging batches;
- `projections.store`: the DuckDB file (its schema, the statements and the Python fold
  that apply a batch, the lifecycle rules the read side derives);
- `projections.audit`: history checked against the lifecycle;
- `projections.query`: read-only SQL, its rendering, the query endpoint, the report;
- `projections.serve`: the projector, replay, the live projection a host runs and the
  state it answers the reconciler with.

See docs/projections.md.
"""
