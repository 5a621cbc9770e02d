"""tierstore's vLLM plugin (import name ``tierstore_plugins.vllm``).

Two ways to load the connector:

- ``kv_connector_module_path="tierstore_plugins.vllm.connector"`` with
  ``kv_connector="TierStoreConnector"`` (no entry point needed);
- the ``vllm.general_plugins`` entry point ``tierstore = "tierstore_plugins.vllm:register"``,
  which vLLM runs in every process; then ``kv_connector="TierStoreConnector"`` is enough.

This module imports nothing from vLLM until :func:`register` runs.
"""

from __future__ import annotations

CONNECTOR_NAME = "TierStoreConnector"
CONNECTOR_MODULE = "tierstore_plugins.vllm.connector"


def register() -> None:
    """Register ``TierStoreConnector`` with vLLM's ``KVConnectorFactory``; safe to call again."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:   # vLLM absent: nothing to register with
        return
    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:    # registered meanwhile (the factory refuses a second registration)
        pass


__all__ = ["CONNECTOR_MODULE", "CONNECTOR_NAME", "register"]
