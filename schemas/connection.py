"""How a NATS URL list becomes nats-py's connect options: the servers, a TLS context and
an NKey seed from the options in its query (`schemas.config.FILE_OPTIONS`). Every client of the project
(the event log, tail, the projector, the projection process) connects through it, so a
`[nats]` table's TLS reaches all of them, in this process and in its children."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from schemas.config import server_list, url_options
from schemas.errors import ConfigError


def connect_options(url: str) -> dict[str, Any]:
    """`servers` and, with a `tls_*` option (or a `tls://` server), `tls`: a context that
    checks the servers against `tls_ca` (else the system's CAs) and presents
    `tls_cert`/`tls_key`. Raises ConfigError when a file cannot be read or is not PEM."""
    servers = server_list(url)
    options = url_options(url)
    out: dict[str, Any] = {"servers": servers}
    seed = options.pop("nkey_seed", None)
    if seed is not None:
        try:
            with Path(seed).open("rb"):  # readable: nats-py reads it when it connects
                pass
        except OSError as e:
            raise ConfigError(f"NATS nkey_seed {seed}: {e.strerror}") from e
        out["nkeys_seed"] = seed
    if options or any(s.startswith("tls://") for s in servers):
        try:
            ctx = ssl.create_default_context(cafile=options.get("tls_ca"))
            if "tls_cert" in options:
                ctx.load_cert_chain(options["tls_cert"], options["tls_key"])
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"NATS TLS files {sorted(options.values())}: {e}") from e
        out["tls"] = ctx
    return out
