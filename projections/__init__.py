"""The read side: the projector (SUP_EVENTS -> DuckDB), the tables and views, replay,
the lifecycle audit and read-only SQL. It imports only the contract (`schemas`).

- `projections.stream`: reading `SUP_EVENTS` (the live projector, the replay's bulk
  reader) and decoding events into staging batches;
- `projections.store`: the DuckDB file (its schema, the statements and the Python fold
  that apply a batch, the lifecycle rules the read side derives);
- `projections.query`: read-only SQL, its rendering, the query endpoint and its client;
- `projections.serve`: the live projection a daemon runs and the state it answers the
  reconciler with;
- `projections.audit`: history checked against the lifecycle;
- `projections.errors`: the read side's branch of the exception tree.

See docs/projections.md.
"""
