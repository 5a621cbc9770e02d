"""Capacity and size strings (tierstore.units)."""

import pytest

from tierstore.errors import ConfigError
from tierstore.units import format_bytes, parse_bytes, parse_capacity


@pytest.mark.parametrize("text,blocks", [
    ("3M", 5859), ("3000000", 5859), ("1000M", 1953125), ("1.5K", 2), ("256blocks", 256),
    ("256 blocks", 256), ("64GiB", 64 * 2**30 // (2 * 2**20)), ("2MiB", 1), ("0", 0),
])
def test_capacity_to_blocks(text, blocks):
    assert parse_capacity(text).to_blocks(512, 2 * 2**20) == blocks


@pytest.mark.parametrize("bad", ["", "abc", "3X", "-1", "1.5blocks", "3 M M", "GiB"])
def test_bad_capacity_is_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        parse_capacity(bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_parse_bytes_and_format():
    assert parse_bytes("2MiB") == 2 * 2**20
    assert parse_bytes("4096") == 4096
    assert format_bytes(2 * 2**20) == "2.0 MiB"
    with pytest.raises(ConfigError):
        parse_bytes("3M")  # tokens are not bytes
