"""The NVMe record header: one encode/verify pair, every field checked."""

import struct

import pytest
import xxhash

from tierstore.errors import FormatError
from tierstore.tiers import record
from tierstore.tiers.record import FLAG_ZSTD, HEADER_BYTES, encode_header, verify_header

KEY = bytes(range(32))
NS = b"n" * 16


def _header(**kw) -> bytearray:
    buf = bytearray(HEADER_BYTES)
    args = dict(key=KEY, ns_digest=NS, size=3_098_112, stored=3_098_112, flags=0,
                checksum=0x1234_5678_9ABC_DEF0, slot=7)
    args.update(kw)
    encode_header(buf, **args)
    return buf


def test_roundtrip_fields():
    h = verify_header(_header(), key=KEY, slot=7)
    assert (h.key, h.ns_digest, h.size, h.stored, h.checksum, h.slot) == \
        (KEY, NS, 3_098_112, 3_098_112, 0x1234_5678_9ABC_DEF0, 7)
    assert h.version == record.FORMAT_VERSION and not h.compressed
    assert bytes(_header()[record.USED_BYTES:]) == bytes(HEADER_BYTES - record.USED_BYTES)


def test_compressed_flag_and_lengths():
    h = verify_header(_header(flags=FLAG_ZSTD, stored=1000, size=65536))
    assert h.compressed and h.stored == 1000
    with pytest.raises(FormatError):   # a "compressed" record may never be larger than raw
        verify_header(_header(flags=FLAG_ZSTD, stored=65536, size=65536))
    with pytest.raises(FormatError):   # raw records store exactly size bytes
        verify_header(_header(flags=0, stored=10, size=65536))


@pytest.mark.parametrize("offset", [0, 5, 9, 41, 50, 60, 70, 85, 90])
def test_any_flipped_byte_fails(offset):
    buf = _header()
    buf[offset] ^= 0x40
    with pytest.raises(FormatError):
        verify_header(buf)


def test_key_and_slot_must_match():
    buf = _header()
    with pytest.raises(FormatError, match="key mismatch"):
        verify_header(buf, key=b"x" * 32)
    with pytest.raises(FormatError, match="slot"):
        verify_header(buf, slot=8)


def test_other_version_is_rejected_even_with_valid_checksum():
    buf = _header()
    struct.pack_into("<H", buf, 4, 99)
    struct.pack_into("<Q", buf, record.BODY_BYTES,
                     xxhash.xxh3_64_intdigest(bytes(buf[:record.BODY_BYTES])))
    with pytest.raises(FormatError, match="version 99"):
        verify_header(buf)


def test_zeroed_magic_is_no_record():
    buf = _header()
    buf[:4] = bytes(4)
    assert not record.is_header_like(buf)
    with pytest.raises(FormatError, match="magic"):
        verify_header(buf)


def test_bad_key_length_refused_at_encode():
    with pytest.raises(ValueError):
        _header(key=b"short")
