"""The client API: the one way admin/ and plugins/ reach a store (DESIGN §3, §6).

- :mod:`.contract`: :class:`~tierstore.client.contract.StoreClient`, the promise every backend
  keeps (errors by class, pins, jobs), written once;
- :mod:`.embedded`: :class:`Client` (``Client.embedded``: a :class:`~tierstore.store.Store` in this
  process) and :func:`open_client`, which picks a backend from a data directory or a socket;
- :mod:`.remote`: :class:`~tierstore.client.remote.RemoteClient` (``Client.connect``: the per-node
  daemon over its Unix socket, block bytes through its shared-memory slab).
"""

from tierstore.client.embedded import (NO_EXTRAS, Client, DataDirBusy, ExtraKeys, Namespace,
                                       StoreClient, open_client)

# the names tierstore.client (a module until issue 16 item 4) exported, kept for its users
__all__ = ["Client", "DataDirBusy", "ExtraKeys", "Namespace", "NO_EXTRAS", "StoreClient",
           "open_client"]
