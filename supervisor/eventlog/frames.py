"""The outbox's file format: records framed as `u32 length | u32 crc32 | msgpack body`,
read back by `scan` (which stops at the first torn or damaged record) and found again past
a damaged one by `next_record` (the CRC framing lets a reader resynchronise). Pure file
I/O."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import msgspec

HEADER = struct.Struct("<II")  # body length, crc32 of the body
MAX_BODY = 64 * 1024 * 1024  # above any NATS max_payload: a bigger length is a torn header
_READ_CHUNK = 4 * 1024 * 1024


class Record(msgspec.Struct, array_like=True, frozen=True):
    """One outbox entry. `seq` counts from 1 within one log; `msg_id` is the Nats-Msg-Id."""

    seq: int
    subject: str
    msg_id: str
    payload: bytes


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Record)


def scan(fd: int, offset: int, end: int) -> Iterator[tuple[int, int, Record]]:
    """Yield `(start, end, record)` for each intact record in the file range
    `[offset, end)`, stopping silently at the first torn or corrupt one (the caller sees
    where by the last `end` it got)."""
    buf = memoryview(b"")
    at = offset
    while at < end:
        if len(buf) < HEADER.size:
            buf = memoryview(os.pread(fd, min(_READ_CHUNK, end - at), at))
            if len(buf) < HEADER.size:
                return
        length, crc = HEADER.unpack_from(buf)
        total = HEADER.size + length
        if length > MAX_BODY:
            return
        if len(buf) < total:
            buf = memoryview(os.pread(fd, min(max(total, _READ_CHUNK), end - at), at))
            if len(buf) < total:
                return
        body = buf[HEADER.size : total]
        if zlib.crc32(body) != crc:
            return
        try:
            record = decoder.decode(body)
        except msgspec.DecodeError:
            return
        yield at, at + total, record
        at += total
        buf = buf[total:]


_MSGPACK_ARRAY_OF_4 = 0x94  # how every record's body starts (`Record` is array-like)
_MIN_BODY = 8


def next_record(fd: int, offset: int, end: int, after_seq: int) -> int | None:
    """The offset of the first whole record in `[offset, end)` whose seq follows
    `after_seq`, or None. Only for recovery: it reads the rest of the file at once."""
    data = os.pread(fd, end - offset, offset)
    for i in range(len(data) - HEADER.size - _MIN_BODY + 1):
        if data[i + HEADER.size] != _MSGPACK_ARRAY_OF_4:
            continue
        length, crc = HEADER.unpack_from(data, i)
        body_at = i + HEADER.size
        if not _MIN_BODY <= length <= len(data) - body_at:
            continue
        body = data[body_at : body_at + length]
        if zlib.crc32(body) != crc:
            continue
        try:
            record = decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if record.seq > after_seq:
            return offset + i
    return None
