"""The per-node daemon (DESIGN §6): :mod:`.server` owns the store and serves local clients over a
Unix socket; :mod:`.remote` is the client side (``RemoteClient``, the same API as
:class:`tierstore.client.Client`). ``python -m tierstore.daemon`` runs it in the foreground."""

from tierstore.daemon.remote import RemoteClient

__all__ = ["RemoteClient"]
