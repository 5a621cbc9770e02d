"""Opening a data directory for the commands that inspect one (tiers, blocks, check).

``--data-dir`` (or ``$TIERSTORE_DATA_DIR``) names a directory created by the store (replay with
``--payload bytes --data-dir``, later the daemon). It is opened in-process with
``Client.embedded(data_dir, create=False)``, which takes the directory's lock: a directory held by
another process is a user error (exit 2), as is one that is missing or not a tierstore directory.
"""

from __future__ import annotations

from typing import Optional

import typer

from tierstore.client import Client
from tierstore_admin.output import fail, user_errors

DATA_DIR_ENV = "TIERSTORE_DATA_DIR"


def data_dir_option() -> Optional[str]:
    return typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV,
                        help=f"Store directory (env {DATA_DIR_ENV}).")


def open_client(data_dir: Optional[str]) -> Client:
    if not data_dir:
        fail(f"no data dir: pass --data-dir or set {DATA_DIR_ENV}")
    with user_errors():
        return Client.embedded(data_dir, create=False)
