"""The read side's branch of the project's exception tree (`schemas.errors`).

DuckDB and nats-py errors are wrapped here with `raise ... from e`; callers (the CLI, the
daemon) act on these classes only.
"""

from __future__ import annotations

from schemas.errors import SupervisorError, redact_url


class ProjectionError(SupervisorError):
    """Something went wrong building or reading the projection."""

    tag = "projection_error"


class ProjectionStoreError(ProjectionError):
    """The DuckDB file cannot be opened, is of another DDL version, or a batch failed to
    apply (the transaction was rolled back; the watermark did not move)."""

    tag = "projection_store_error"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"projection {path}: {detail}")


# What DuckDB says of a file whose blocks are damaged (it has no exception class of its own
# for it, so the text is the evidence; this is the one place that reads it).
_DAMAGE_MARKS = (
    "Corrupt database file",
    "Could not read enough bytes",
    "not a valid DuckDB database file",
    "checksum",
)


def is_damage(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the projection file is damaged
    (truncated, zeroed, a failed checksum): derived data to set aside and rebuild."""
    seen: BaseException | None = error
    while seen is not None:
        if any(mark in str(seen) for mark in _DAMAGE_MARKS):
            return True
        seen = seen.__cause__
    return False


class ProjectionDamaged(ProjectionError):
    """A query met a damaged projection file; it is being set aside and rebuilt."""

    tag = "projection_damaged"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            "the projection file is damaged; it is set aside and rebuilt from the stream "
            f"(try again shortly): {detail}"
        )


class ProjectionVersionMismatch(ProjectionStoreError):
    """The file was built by another DDL version of the projection: replay it."""

    tag = "projection_version_mismatch"

    def __init__(self, path: str, found: int, expected: int) -> None:
        self.found = found
        self.expected = expected
        super().__init__(
            path, f"built by DDL version {found}, this reader is version {expected}: replay it"
        )


class StreamUnavailable(ProjectionError):
    """`SUP_EVENTS` could not be read (NATS unreachable, JetStream not answering)."""

    tag = "stream_unavailable"

    def __init__(self, url: str, detail: str) -> None:
        self.url = redact_url(url)
        self.detail = detail
        super().__init__(f"cannot read SUP_EVENTS at {self.url}: {detail}")


class QueryError(ProjectionError):
    """A read-only query could not be run."""

    tag = "query_error"


class QueryRefused(QueryError):
    """The statement is not one read-only SELECT; nothing was executed."""

    tag = "query_refused"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"query refused: {reason}")


class QueryFailed(QueryError):
    """DuckDB raised while running an accepted statement (unknown table, bad cast...)."""

    tag = "query_failed"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"query failed: {detail}")


class QueryMemory(QueryFailed):
    """The statement needed more than the projection's memory limit (and its spill)."""

    tag = "query_memory"


class QueryTimeout(QueryError):
    """The statement ran past its time limit and was interrupted."""

    tag = "query_timeout"

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        super().__init__(f"query interrupted after its time limit of {limit_s:g}s")


class DaemonUnreachable(ProjectionError):
    """No daemon answered at the HTTP address (`supervisor sql` without `--db`)."""

    tag = "daemon_unreachable"

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"no daemon answered at {url}: {detail}")


class DaemonRefused(ProjectionError):
    """The daemon answered a query with an error: its HTTP `status` and the catalogue
    `code` of its body (`QUERY_REFUSED`, `QUERY_TIMEOUT`, `UNAUTHORIZED`, ...)."""

    tag = "daemon_refused"

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)
