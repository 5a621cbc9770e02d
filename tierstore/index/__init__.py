"""The index: one residency map over all tiers, the pin books, and longest-prefix lookup."""
