"""Tooling shared by every stage: checkpoints and strict loading (checkpoint.py), the shipped tiny weights and their
sha256 checks (shipped.py), devices, seeds and progress bars (runtime.py), data-parallel training under torchrun
(distributed.py) and figure helpers (figures.py).
"""
