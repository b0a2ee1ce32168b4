"""The connection to NATS: the `[nats]` table (`NatsConfig`), the URL list it becomes, and
how that list becomes nats-py's connect options (the servers, a TLS context and an NKey
seed from the options in its query, `FILE_OPTIONS`). Every client of the project (the event
log, tail, the projector, the projection process) connects through it, so a `[nats]`
table's TLS reaches all of them, in this process and in its children."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct

from schemas.errors import ConfigError
from schemas.lifecycle import Keyring
from schemas.streams import is_public_key

_URL_UNSAFE = frozenset("@:/,?# ")


class NatsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """Where NATS is, and who this process is there. `servers` are tried in turn and the
    client reconnects across them; `user`/`password` (or `token`) are sent to each. The
    streams this process creates get `replicas` copies, and an existing stream with
    another count is updated to it: 1 on one server, 3 on a three-server cluster."""

    servers: Annotated[
        list[str],
        msgspec.Meta(
            description="NATS URLs of the cluster (`nats://host:port`); empty: see `nats_url`."
        ),
    ] = msgspec.field(default_factory=list)
    user: Annotated[str | None, msgspec.Meta(description="User name sent to the servers.")] = None
    password: Annotated[str | None, msgspec.Meta(description="Password of `user`.")] = None
    token: Annotated[
        str | None, msgspec.Meta(description="Token sent to the servers (instead of a user).")
    ] = None
    replicas: Annotated[
        int,
        msgspec.Meta(
            description="Copies of each stream this process creates or updates (1, 3 or 5)."
        ),
        msgspec.Meta(ge=1, le=5),
    ] = 1
    tls_ca: Annotated[
        str | None,
        msgspec.Meta(description="CA file (PEM) the servers' certificates are checked against."),
    ] = None
    tls_cert: Annotated[
        str | None, msgspec.Meta(description="This client's certificate (PEM), for mutual TLS.")
    ] = None
    tls_key: Annotated[str | None, msgspec.Meta(description="The key (PEM) of `tls_cert`.")] = None
    nkey_seed: Annotated[
        str | None,
        msgspec.Meta(
            description="A file holding this client's NKey seed (`SU...`), instead of a user or token."
        ),
    ] = None

    def __post_init__(self) -> None:
        for name in ("user", "password", "token"):
            value = getattr(self, name)
            if value is not None and (not value or _URL_UNSAFE & set(value)):
                raise ValueError(
                    f"nats.{name} must be non-empty, without any of @ : / , ? # or a space"
                )
        if self.password is not None and self.user is None:
            raise ValueError("nats.password needs nats.user")
        if sum(x is not None for x in (self.token, self.user, self.nkey_seed)) > 1:
            raise ValueError("nats.user, nats.token and nats.nkey_seed exclude each other")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("nats.tls_cert and nats.tls_key go together")
        for name in FILE_OPTIONS:
            value = getattr(self, name)
            if value is not None and (not value or set(value) & set("?&=,#")):
                raise ValueError(f"nats.{name} must be a file path without any of ? & = , #")
        for url in self.servers:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("nats", "tls") or not rest or "@" in rest or "," in rest:
                raise ValueError(
                    f"nats.servers: {url!r} is not nats://host:port (without credentials)"
                )

    def url(self) -> str | None:
        """The servers as one comma-separated URL list carrying the credentials (what every
        client of the project connects with), or None when no server is set."""
        if not self.servers:
            return None
        userinfo = (
            f"{self.user}:{self.password}@"
            if self.user and self.password
            else f"{self.user}@"
            if self.user
            else f"{self.token}@"
            if self.token
            else ""
        )
        servers = ",".join(
            f"{s.partition('://')[0]}://{userinfo}{s.partition('://')[2]}" for s in self.servers
        )
        files = "&".join(f"{n}={getattr(self, n)}" for n in FILE_OPTIONS if getattr(self, n))
        return f"{servers}?{files}" if files else servers


FILE_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "nkey_seed")
"""The `[nats]` keys (files) that travel in a NATS URL's query (`...?tls_ca=/etc/ca.pem`)."""


def server_list(url: str) -> list[str]:
    """The URLs of a comma-separated list (`--nats`, `SUPERVISOR_NATS_URL`, `NatsConfig.url`),
    without the query of client options (`url_options`)."""
    servers, _, _ = url.partition("?")
    return [u.strip() for u in servers.split(",") if u.strip()]


def url_options(url: str) -> dict[str, str]:
    """The client options in the query that ends a NATS URL list (`FILE_OPTIONS`); an unknown
    one is an error (ConfigError), never silently dropped."""
    _, _, query = url.partition("?")
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        if key not in FILE_OPTIONS or not value:
            raise ConfigError(
                f"NATS URL option {pair!r}: known options are {', '.join(FILE_OPTIONS)}"
            )
        options[key] = value
    return options


class SigningConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """Who signs this node's events, and whose signatures this node's readers (its
    projection, `?wait`, `audit`) take as each node's (`schemas.lifecycle.Keyring`)."""

    seed_file: Annotated[
        str | None,
        msgspec.Meta(
            description="The NKey seed file this node signs its events with (none: `[nats] "
            "nkey_seed` when set, else `signing.nk` in the data dir, made at first start)."
        ),
    ] = None
    keys: Annotated[
        dict[str, list[str]],
        msgspec.Meta(
            description="Public NKeys pinned per node id: that node's ends count only when "
            "signed by one of them (two during a rotation); others' keys are learned on first use."
        ),
    ] = msgspec.field(default_factory=dict)
    required: Annotated[
        bool,
        msgspec.Meta(
            description="Refuse an unsigned end even from a node never seen signing "
            "(otherwise a history from before signing counts)."
        ),
    ] = False

    def __post_init__(self) -> None:
        for node, keys in self.keys.items():
            bad = [k for k in keys if not is_public_key(k)]
            if bad or not keys:
                raise ValueError(f"[signing] keys of {node!r}: {bad or 'none'}: not a public NKey")

    def keyring(self) -> Keyring:
        """A new keyring with these pins (each reader learns the others itself)."""
        return Keyring(
            {node: tuple(keys) for node, keys in self.keys.items()}, required=self.required
        )


INBOX_ROLES = ("node", "reader")
"""The users of the supervisor's own servers whose replies come on their own prefix."""


def anonymous(url: str) -> bool:
    """Whether `url` connects without any credential (no user, token or NKey)."""
    servers = server_list(url)
    return "nkey_seed" not in url_options(url) and not any(
        urlsplit(u).username or urlsplit(u).password for u in servers
    )


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def connect_options(url: str) -> dict[str, Any]:
    """`servers` and, with a `tls_*` option (or a `tls://` server), `tls`: a context that
    checks the servers against `tls_ca` (else the system's CAs) and presents
    `tls_cert`/`tls_key`. Raises ConfigError when a file cannot be read or is not PEM."""
    servers = server_list(url)
    options = url_options(url)
    out: dict[str, Any] = {"servers": servers}
    user = urlsplit(servers[0]).username if servers else None
    if user in INBOX_ROLES:
        # Each role reads its replies on its own prefix, which no other role may read.
        out["inbox_prefix"] = inbox_prefix(user)
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
