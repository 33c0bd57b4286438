"""The run store: one folder per training run, keyed by everything that changes its result, trained once and
resumed (`store`), and the stage-level grids of runs (`training`). Imports `core` only."""
