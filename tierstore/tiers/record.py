"""The on-disk record header of the NVMe tier: one 4096-byte block in front of every payload.

A record is ``HEADER_BYTES`` of header followed by the stored payload padded to 4096 bytes, so
every record starts and ends on a 4096-byte boundary (O_DIRECT on any device with a logical block
size up to 4096). The true lengths live in the header (and in LMDB); the padding is never read as
payload.

Byte table (little-endian; bytes 96..4095 are zero)::

    offset  size  field
    ------  ----  -----------------------------------------------------------------
         0     4  magic            b"TSNV"  (zeroed when a record is deleted)
         4     2  version          FORMAT_VERSION (1)
         6     2  flags            bit 0 FLAG_ZSTD: payload stored zstd-compressed
                                    (clear = stored raw; incompressible blocks stay raw)
         8    32  key              the block key (32 raw bytes)
        40     8  size             payload length, uncompressed, in bytes
        48     8  stored           bytes of payload on disk (== size when raw)
        56     8  checksum         xxh3-64 of the *uncompressed* payload
        64    16  ns_digest        Namespace.digest() of the block
        80     8  slot             the tier slot the record was written for
        88     8  header_checksum  xxh3-64 of bytes 0..87
        96  4000  zero

One encode/verify pair: :func:`encode_header` writes a header into a caller-owned buffer (no
allocation on the hot path), :func:`verify_header` parses one and raises :class:`FormatError`
when anything is off. Pure functions; safe on any thread.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from tierstore.errors import FormatError

MAGIC = b"TSNV"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x1
HEADER_BYTES = 4096
KEY_BYTES = 32
NS_BYTES = 16

_BODY = struct.Struct("<4sHH32sQQQ16sQ")   # bytes 0..87
_SUM = struct.Struct("<Q")                  # bytes 88..95
BODY_BYTES = _BODY.size                     # 88
USED_BYTES = BODY_BYTES + _SUM.size         # 96
assert BODY_BYTES == 88

_xxh = xxhash.xxh3_64_intdigest


class RecordHeader(NamedTuple):
    version: int
    flags: int
    key: bytes
    size: int
    stored: int
    checksum: int
    ns_digest: bytes
    slot: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)


def encode_header(buf, *, key: bytes, ns_digest: bytes, size: int, stored: int, flags: int,
                  checksum: int, slot: int) -> None:
    """Write a header into ``buf[:USED_BYTES]`` (``buf`` is writable, >= 96 bytes; the caller keeps
    bytes 96..4095 of its header block zero)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    if len(ns_digest) != NS_BYTES:
        raise ValueError(f"ns_digest must be {NS_BYTES} bytes, got {len(ns_digest)}")
    _BODY.pack_into(buf, 0, MAGIC, FORMAT_VERSION, flags, key, size, stored, checksum, ns_digest,
                    slot)
    _SUM.pack_into(buf, BODY_BYTES, _xxh(memoryview(buf)[:BODY_BYTES]))


def verify_header(buf, *, key: bytes | None = None, slot: int | None = None) -> RecordHeader:
    """Parse and check a header block; ``key``/``slot`` when given must match.

    Raises :class:`FormatError` (one-line message) on a bad magic, version, header checksum,
    key or slot.
    """
    mv = memoryview(buf)
    if len(mv) < USED_BYTES:
        raise FormatError("record header truncated")
    magic, version, flags, k, size, stored, checksum, ns, s = _BODY.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FormatError("record header: bad magic (no record here)")
    (hsum,) = _SUM.unpack_from(mv, BODY_BYTES)
    if hsum != _xxh(mv[:BODY_BYTES]):
        raise FormatError("record header: header checksum mismatch")
    if version != FORMAT_VERSION:
        raise FormatError(f"record header: format version {version}, expected {FORMAT_VERSION}")
    if (stored >= size) if flags & FLAG_ZSTD else (stored != size):
        raise FormatError("record header: stored length does not fit the flags")
    if key is not None and k != key:
        raise FormatError("record header: key mismatch")
    if slot is not None and s != slot:
        raise FormatError(f"record header: written for slot {s}, found in slot {slot}")
    return RecordHeader(version, flags, k, size, stored, checksum, ns, s)


def is_header_like(buf) -> bool:
    """True when ``buf`` starts with the record magic (cheap orphan pre-filter)."""
    return bytes(memoryview(buf)[:4]) == MAGIC
