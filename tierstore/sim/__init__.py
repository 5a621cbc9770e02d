"""The simulator: trace replay, policy sweeps and cluster routing over real stores.

Not the store's core: nothing under ``tierstore/`` outside this package imports it. It drives
:class:`~tierstore.store.Store` the way a prefill node (or N of them behind a router) would and
reports hit ratios; ``tierstore replay`` (admin/replay.py) parses flags and prints.

- :mod:`.workload`: the synthetic multi-turn trace (the main job's embedded default);
- :mod:`.replay`: one store, one trace (Mooncake JSONL format);
- :mod:`.sweep`: policy × capacity, with Belady's optimum and the infinite cache;
- :mod:`.cluster_replay`: N nodes behind a KV-event router (``--nodes``, ``--route``).
"""
