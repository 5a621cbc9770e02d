"""tierstore: a tiered KV-cache store for LLM inference.

One pool per node spans GPU HBM, host DRAM and NVMe under one prefix index (see docs/DESIGN.md in
the shared design folder and README.md). The public entry points are :class:`tierstore.store.Store`
(in-process) and :class:`tierstore.client.Client` (the one API admin/ and plugins/ use).
"""

__version__ = "0.1.0"
