"""Parsing of capacities and sizes given by people: CLI flags, TOML values, environment variables.

This is the one grammar, the same everywhere (case-insensitive, spaces between number and unit
allowed). A **capacity** (how much a cache holds: ``--capacity``, ``--dram-capacity``,
``--nvme-capacity``, ``[dram] capacity``, ``[nvme] capacity``) always names what it counts::

    3M  250K  1.5G  3000000tokens     tokens: K = 1e3, M = 1e6, G = 1e9, or the word "tokens";
                                      blocks = floor(tokens / block tokens)
    64GiB  512MiB  10GB  4096B        bytes: KiB MiB GiB TiB (powers of 1024), KB MB GB TB
                                      (powers of 1000), B; blocks = floor(bytes / block bytes)
    256blocks  1 block                blocks
    0                                 nothing (no tier); the one bare number allowed

A bare number other than 0 is refused: ``4194304`` could be tokens, bytes or blocks, and reading it
the wrong way silently sizes a cache 512 or 64 Ki times off. The daemon's own capacities refuse
tokens (it serves many block sizes, each with its own tokens per block).

A **size** (a key or flag whose name says bytes: ``slot_bytes``, ``--block-bytes``,
``write_queue``) is bytes: ``2MiB``, ``1.5GiB``, ``4096B`` or a bare ``4096``; tokens and blocks are
refused.

Durations (pin TTLs)::

    30s  30m  2h  1d  1.5h     seconds, minutes, hours, days; a bare number is seconds

Every parse error is a :class:`ConfigError` with a one-line message naming the bad text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tierstore.errors import ConfigError

_BYTE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_TOKEN_MULT = {"k": 10**3, "m": 10**6, "g": 10**9, "token": 1, "tokens": 1}
EXAMPLES = "examples: 3M tokens, 64GiB, 256blocks"
_MAX_NUMBER = 1e18   # beyond any real cache; keeps int conversion and slot arithmetic finite
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Capacity:
    """A capacity as given: exactly one of tokens, bytes or blocks is set."""

    tokens: int | None = None
    bytes: int | None = None
    blocks: int | None = None
    text: str = ""

    def to_blocks(self, block_tokens: int, block_bytes: int) -> int:
        """Number of whole blocks: floor(tokens / block_tokens), floor(bytes / block_bytes)."""
        if self.blocks is not None:
            return self.blocks
        if self.tokens is not None:
            return self.tokens // block_tokens
        return self.bytes // max(block_bytes, 1)


def parse_capacity(text: str | int) -> Capacity:
    """Parse ``text`` per the module grammar (a unit is required). Raises ConfigError."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot parse capacity {text!r} ({EXAMPLES})")
    if isinstance(text, int):
        text = str(text)
    m = _RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot parse capacity {text!r} ({EXAMPLES})")
    num, unit = m.group(1), m.group(2).lower()
    value = float(num)
    if not value < _MAX_NUMBER:
        raise ConfigError(f"capacity {text!r} is too large")
    if unit == "":
        if value == 0:
            return Capacity(blocks=0, text=str(text))
        n, hint = m.group(1), _human_bytes_hint(value)
        as_bytes = f"{n}B" + (f" or {hint}" if hint != f"{n}B" else "")
        raise ConfigError(f"capacity {text!r} has no unit: say what it counts: {as_bytes} "
                          f"(bytes), {n}blocks, or {n}tokens")
    if unit in ("block", "blocks"):
        if value != int(value):
            raise ConfigError(f"block count must be whole: {text!r}")
        return Capacity(blocks=int(value), text=str(text))
    if unit in _BYTE_UNITS:
        return Capacity(bytes=int(value * _BYTE_UNITS[unit]), text=str(text))
    if unit in _TOKEN_MULT:
        return Capacity(tokens=int(value * _TOKEN_MULT[unit]), text=str(text))
    raise ConfigError(f"cannot parse capacity {text!r}: unknown unit {m.group(2)!r} "
                      "(K/M/G or 'tokens' for tokens, B/KiB/MiB/GiB/TiB for bytes, or 'blocks')")


def _human_bytes_hint(value: float) -> str:
    """``4194304`` -> ``4MiB``: the binary form of a byte count when it is a whole one."""
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= mult and value % mult == 0:
            return f"{int(value // mult)}{unit}"
    return f"{int(value)}B"


def parse_bytes(text: str | int) -> int:
    """Parse a size in bytes ('2MiB', '4096', '1.5GiB'). Raises ConfigError."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot parse size {text!r} (examples: 4096, 2MiB, 1.5GiB)")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    m = _RE.match(str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS | {"": 1}:
        raise ConfigError(f"cannot parse size {text!r} (examples: 4096, 2MiB, 1.5GiB)")
    unit = m.group(2).lower() or "b"
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    if not value < _MAX_NUMBER:
        raise ConfigError(f"size {text!r} is too large")
    return int(value)


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """Parse a positive duration ('30s', '30m', '2h', '1d', '90') into seconds. Raises
    ConfigError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _RE.match(str(text))
        unit = m.group(2).lower() if m else None
        if unit not in _DURATION_UNITS:
            raise ConfigError(f"cannot parse duration {text!r} (examples: 30s, 30m, 2h, 1d)")
        value = float(m.group(1)) * _DURATION_UNITS[unit]
    if not value > 0:
        raise ConfigError(f"duration must be positive: {text!r}")
    if not value < _MAX_NUMBER:
        raise ConfigError(f"duration {text!r} is too large")
    return value


def format_bytes(n: int | float) -> str:
    """Human form with binary units: 2097152 -> '2.0 MiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
