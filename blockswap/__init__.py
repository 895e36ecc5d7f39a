"""BlockSwap's library: everything the scripts at the repository root (main.py, fisher_rank.py,
study.py, export.py, plots.py, count_ops.py) call. docs/layout.md says what lives where;
`models` (the block and family tables) is its own package beside this one."""
