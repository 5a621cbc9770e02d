"""Data movement primitives: batched block copies between paged KV caches and slot slabs
(copy.py), and the disk I/O engine of the NVMe tier (disk.py). No policy, no index."""
