"""Opening the store for the commands that inspect one (tiers, blocks, check, stats).

``--socket`` (or ``$TIERSTORE_SOCKET``) goes through a running daemon; a daemon that does not
answer is exit 3, never a silent fallback. Otherwise ``--data-dir`` (or ``$TIERSTORE_DATA_DIR``)
names a directory created by the store (replay with ``--payload bytes --data-dir``, or the
daemon), opened in-process with ``Client.embedded(data_dir, create=False)``, which takes the
directory's lock: a directory held by another process (a running daemon: use ``--socket``) is a
user error (exit 2), as is one that is missing or not a tierstore directory.
"""

from __future__ import annotations

from typing import Optional

import typer

from tierstore_admin.output import fail, user_errors

DATA_DIR_ENV = "TIERSTORE_DATA_DIR"
SOCKET_ENV = "TIERSTORE_SOCKET"


def data_dir_option() -> Optional[str]:
    return typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV,
                        help="Store directory, opened in this process (not while a daemon owns it).")


def socket_option() -> Optional[str]:
    return typer.Option(None, "--socket", envvar=SOCKET_ENV,
                        help="Go through the daemon on this Unix socket.")


def open_client(data_dir: Optional[str], socket: Optional[str] = None):
    """The daemon backend when ``socket`` is given, else the data dir in-process."""
    if not data_dir and not socket:
        fail(f"no store: pass --socket (daemon) or --data-dir, or set {SOCKET_ENV} / {DATA_DIR_ENV}")
    from tierstore.client import open_client as _open_backend   # heavy: only when a command runs

    with user_errors():
        return _open_backend(data_dir=None if socket else data_dir, socket=socket, create=False)
