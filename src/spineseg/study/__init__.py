"""The study layer: profiles, the run store, the stages, tables, figures, notebooks and benchmarks.

It builds on the library (`spineseg.models`, `train`, `ensemble`, `metrics`, `stats`, `data`, …),
which never imports anything from here: the dependency runs one way (checked by `make lint`).
"""
