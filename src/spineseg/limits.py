"""Bounds that every entry point shares: a value past them is a typo that would exhaust memory or run for years
before it taught anything, so it is refused up front (profiles, bundles, the `spineseg data` commands)."""

MAX_SIDE = 8192  # pixels of any image side the study stores, trains at or reads from a model's description
MAX_SEED = 2**32 - 1  # numpy's seeds
