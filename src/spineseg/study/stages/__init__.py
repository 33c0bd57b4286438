"""The stages: each computes its results from the run store and writes its records (stage 0–4 and 6, the
two-stage and located variants, the ensemble's inputs). Imports `runs` and `core`; never `report` or `inference`."""
