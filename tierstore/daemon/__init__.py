"""The per-node daemon (DESIGN §6): :mod:`.server` owns the store and serves local clients over a
Unix socket; :mod:`.peers` runs its peer server, fetcher and membership; :mod:`.publisher` puts
its KV events on ZMQ. The client side is :class:`tierstore.client.remote.RemoteClient`.
``python -m tierstore.daemon`` runs it in the foreground."""
