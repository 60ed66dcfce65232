"""Workflows: what a command does end to end, above the single run.

run (every run mode dispatched in one place), iterative rounds, continual
(OFS-DPO/COFS-DPO) stages, candidate generation, generate from a run, prepare a
dataset, and the demos. Workflows call train/loop and the layers below it; no
layer below imports a workflow (the import-linter contract in pyproject.toml).
"""
