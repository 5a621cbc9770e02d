"""One exception tree for tierstore.

Callers tell outcomes apart by class, never by message text::

    TierStoreError
    ├── ConfigError            bad configuration or user input (capacity strings, TOML, ...)
    │   └── KeyPrefixError     a hex key prefix naming no resident block, or more than one
    ├── FormatError            on-disk data of another format version, or not ours at all
    ├── PinError               unpin without a matching pin, pin of a non-resident block
    ├── RejectedError          the store refused an operation (tier full, block too large, ...)
    │   └── AccessDenied       the caller may not use this daemon (another uid on its socket)
    ├── JobError               unknown or already completed job id
    ├── TransferFailed         bytes could not be moved (I/O error, peer gone, copy failed)
    │   └── ChecksumFailed     bytes were moved but failed their checksum
    ├── RetryLater             transient: try again (carries ``after_s``)
    ├── ProtocolError          a malformed or unexpected frame on the daemon socket
    └── DaemonUnreachable      a daemon was asked for and cannot be reached (CLI exit code 3);
                               also raised when the connection is lost in the middle of a call
"""

from __future__ import annotations


class TierStoreError(Exception):
    """Base of every error tierstore raises on purpose."""


class ConfigError(TierStoreError, ValueError):
    """Invalid configuration or user input; the message is one line meant for a person."""


class KeyPrefixError(ConfigError):
    """A hex key prefix given to ``resolve`` names more than one resident block (ambiguous) or
    none (unknown); the message says which and quotes the prefix."""


class FormatError(TierStoreError):
    """Persistent data has an unknown format or version (e.g. an LMDB env from another release)."""


class PinError(TierStoreError):
    """A pin operation that would break the pin books (double unpin, unknown owner or key)."""


class RejectedError(TierStoreError):
    """The store refused the request (e.g. every candidate victim is pinned)."""


class AccessDenied(RejectedError):
    """The daemon refused the caller itself: its uid is neither the daemon's nor root's
    (SO_PEERCRED on the Unix socket). Every request but PING is refused and counted."""


class JobError(TierStoreError):
    """Unknown, foreign or already completed job id."""


class TransferFailed(TierStoreError):
    """Bytes could not be moved between tiers or peers."""


class ChecksumFailed(TransferFailed):
    """Bytes were read but do not match their recorded checksum."""


class RetryLater(TierStoreError):
    """A transient condition; retry after ``after_s`` seconds."""

    def __init__(self, message: str, after_s: float = 0.0) -> None:
        super().__init__(message)
        self.after_s = after_s


class ProtocolError(TierStoreError):
    """A frame or message that breaks the daemon protocol (tierstore/protocol/codec.py)."""


class DaemonUnreachable(TierStoreError, ConnectionError):
    """No daemon answers on the socket, or the connection to it was lost (its pins and
    unfinished jobs were released by the daemon). The CLI maps it to exit code 3."""
