"""Tiers: fixed-slot slabs that hold block bytes (hbm, dram), or records on disk (nvme)."""
