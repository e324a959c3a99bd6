"""The tools beyond training and evaluation, each run from the repository's root as `python -m tools.NAME`:
benchmark (speed and memory), ablation (Table 2 over seeds, Figs. 4-6), cris (CRIS-format checkpoints)."""
