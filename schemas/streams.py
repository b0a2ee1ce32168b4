"""Names and shapes of the JetStream streams (the contract: extend, don't rename).

The shapes are plain data (`StreamSpec`); `supervisor.eventlog.streams` turns one into the
client library's `StreamConfig`, so that the contract imports no NATS client."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Final, Literal

import nkeys
from msgspec import Struct
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

EVENTS_STREAM = "SUP_EVENTS"
EVENTS_SUBJECTS = ["sup.>"]
TASKS_STREAM = "SUP_TASKS"
TASKS_SUBJECTS = ["suptask.*"]
COMMANDS_STREAM = "SUP_COMMANDS"
COMMANDS_SUBJECTS = ["supcmd.>"]

# Long enough that an outbox replayed after a NATS outage is still deduplicated by
# Nats-Msg-Id for everything that was in flight when the connection dropped.
DUPLICATE_WINDOW_S = 600.0


class StreamSpec(Struct, frozen=True, kw_only=True):
    """One stream as the project declares it. `max_age_s` / `max_bytes`: None leaves an
    existing stream's limit as it is (a new one keeps everything); 0 / -1 is explicitly
    no limit."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"]
    replicas: int = 1
    duplicate_window_s: float = DUPLICATE_WINDOW_S
    max_age_s: float | None = None
    max_bytes: int | None = None
    max_msgs_per_subject: int | None = None
    discard_new_per_subject: bool = False
    deny_delete: bool = False
    deny_purge: bool = False


def events_stream(
    replicas: int = 1, max_age_s: float | None = None, max_bytes: int | None = None
) -> StreamSpec:
    """`SUP_EVENTS`, the history: append-only. No API may delete or purge it, and no update
    can take that back (JetStream refuses it); lowering a limit is kept out of the node's
    reach by its permissions (`supervisor.eventlog.nats_auth`)."""
    window = DUPLICATE_WINDOW_S
    if max_age_s:  # JetStream refuses a duplicate window longer than the age limit
        window = min(window, max_age_s)
    return StreamSpec(
        name=EVENTS_STREAM,
        subjects=tuple(EVENTS_SUBJECTS),
        retention="limits",
        replicas=replicas,
        duplicate_window_s=window,
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        deny_delete=True,
        deny_purge=True,
    )


def tasks_stream(per_priority_bound: int = 1000, replicas: int = 1) -> StreamSpec:
    """`SUP_TASKS`, the durable priority queue: a work queue bounded per priority subject
    (a full priority refuses new messages)."""
    return StreamSpec(
        name=TASKS_STREAM,
        subjects=tuple(TASKS_SUBJECTS),
        retention="workqueue",
        replicas=replicas,
        max_msgs_per_subject=per_priority_bound,
        discard_new_per_subject=True,
    )


def commands_stream(replicas: int = 1) -> StreamSpec:
    """`SUP_COMMANDS`, the reconciler's cleanup commands: a work queue."""
    return StreamSpec(
        name=COMMANDS_STREAM,
        subjects=tuple(COMMANDS_SUBJECTS),
        retention="workqueue",
        replicas=replicas,
    )


# --- signed events ---------------------------------------------------------------------
#
# Each node signs every event it publishes with an Ed25519 NKey of its own. The signature
# travels in the payload, as its last member: `"sig":"<public key>.<signature>"`, the
# node's public NKey (`U...`, or any NKey type) and the unpadded base64url signature of the
# payload without that member (the event's JSON exactly as encoded). Readers that ignore
# the member see the event unchanged. Which key is a node's is `schemas.lifecycle.Keyring`'s.

SIG_MEMBER: Final = b',"sig":"'
_SIG_END: Final = b'"}'
SIGNATURE_BYTES: Final = len(SIG_MEMBER) + 56 + 1 + 86 + len(_SIG_END) - 1
"""What a signature adds to a payload: the member, a public NKey, the dot, the signature."""
_VERIFIERS: dict[str, VerifyKey | None] = {}


class EventSigner:
    """Signs payloads with one NKey seed (`SU...`, `SN...`, ...: any seed nkeys reads)."""

    def __init__(self, seed: bytes) -> None:
        try:
            self._key = nkeys.from_seed(bytearray(seed.strip()))
            self.public_key: str = self._key.public_key.decode()
        except (nkeys.NkeysError, ValueError, binascii.Error) as e:
            raise ValueError(f"not an NKey seed: {type(e).__name__}") from None
        self._prefix: bytes = SIG_MEMBER + self.public_key.encode() + b"."

    def sign(self, payload: bytes) -> bytes:
        """`payload` (one JSON object) with its signature member appended."""
        signature: bytes = self._key.sign(payload)
        sig = base64.urlsafe_b64encode(signature).rstrip(b"=")
        return payload[:-1] + self._prefix + sig + _SIG_END


def new_seed() -> bytes:
    """A new user NKey seed (`SU...`), for a node that has none."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def payload_signer(payload: bytes) -> str | None:
    """Who signed `payload`: the public key whose signature verifies; "" when it carries a
    signature member that does not verify (altered, or not a key); None when unsigned."""
    at = payload.rfind(SIG_MEMBER)
    if at < 0 or not payload.endswith(_SIG_END):
        return None
    key, _, sig = payload[at + len(SIG_MEMBER) : -len(_SIG_END)].partition(b".")
    public = key.decode("ascii", "replace")
    if public in _VERIFIERS:
        verifier = _VERIFIERS[public]
    else:
        verifier = _verify_key(public)
        if len(_VERIFIERS) >= 4096:
            _VERIFIERS.clear()
        _VERIFIERS[public] = verifier
    if verifier is None:
        return ""
    try:
        verifier.verify(payload[:at] + b"}", base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4)))
    except (BadSignatureError, ValueError, binascii.Error, TypeError):
        return ""
    return public


def is_public_key(text: str) -> bool:
    """Whether `text` is a public NKey (`U...`, `N...`, ...) a signature can be checked with."""
    return _verify_key(text) is not None


def _verify_key(public: str) -> VerifyKey | None:
    """The Ed25519 key of a public NKey (base32 of prefix, key, CRC16); None if it is not one."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        return None
    if nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        return None
    return VerifyKey(raw[1:33])
