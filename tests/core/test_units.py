"""Capacity and size strings (tierstore.units): one grammar for the CLI, TOML and the environment."""

import pytest

from tierstore.errors import ConfigError
from tierstore.units import format_bytes, parse_bytes, parse_capacity


@pytest.mark.parametrize("text,blocks", [
    ("3M", 5859), ("3000000tokens", 5859), ("3000000 tokens", 5859), ("1000M", 1953125),
    ("1.5K", 2), ("256blocks", 256), ("256 blocks", 256), ("64GiB", 64 * 2**30 // (2 * 2**20)),
    ("2MiB", 1), ("4194304B", 2), ("0", 0), (0, 0),
])
def test_capacity_to_blocks(text, blocks):
    assert parse_capacity(text).to_blocks(512, 2 * 2**20) == blocks


@pytest.mark.parametrize("bad", ["", "abc", "3X", "-1", "1.5blocks", "3 M M", "GiB", True])
def test_bad_capacity_is_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        parse_capacity(bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


@pytest.mark.parametrize("bare", ["4194304", 4194304, "3000000"])
def test_bare_number_capacity_is_refused_with_the_spellings_that_mean_something(bare):
    """Issue 14 item 4: a bare number was tokens in one place and bytes in another; now it is
    refused everywhere, and the message offers bytes, blocks and tokens spellings."""
    with pytest.raises(ConfigError) as e:
        parse_capacity(bare)
    msg = str(e.value)
    assert "no unit" in msg and f"{bare}B" in msg and f"{bare}blocks" in msg and f"{bare}tokens" in msg
    if str(bare) == "4194304":
        assert "4MiB" in msg


def test_parse_bytes_and_format():
    assert parse_bytes("2MiB") == 2 * 2**20
    assert parse_bytes("4096") == 4096
    assert parse_bytes(4096) == 4096
    assert format_bytes(2 * 2**20) == "2.0 MiB"
    for bad in ("3M", "2blocks", True, -1):   # tokens and blocks are not bytes
        with pytest.raises(ConfigError):
            parse_bytes(bad)
