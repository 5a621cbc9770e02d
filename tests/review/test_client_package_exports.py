"""``tierstore.client`` kept its import path (a module became a package today) but lost five of
the seven names its ``__all__`` promised at fd5e18d: ``from tierstore.client import Namespace,
StoreClient, DataDirBusy, ExtraKeys, NO_EXTRAS`` raises ImportError now (the package re-exports
only Client and open_client). A user script or integration written against the public names
breaks on an upgrade that was meant to only rename internal modules."""

import importlib

OLD_ALL = ["Client", "DataDirBusy", "ExtraKeys", "Namespace", "NO_EXTRAS", "StoreClient",
           "open_client"]


def test_tierstore_client_still_exports_its_old_public_names():
    m = importlib.import_module("tierstore.client")
    missing = [n for n in OLD_ALL if not hasattr(m, n)]
    assert missing == []
    assert set(OLD_ALL) <= set(m.__all__)
