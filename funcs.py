"""The seed's funcs.py: Fisher potential, budgets and exact sampling (blockswap/funcs.py).

Kept at the root with the design card's names so that users' scripts keep working:
`funcs.get_no_params`, `funcs.one_shot_fisher`, `funcs.load_genotype`, `funcs.save_genotype`,
and every other public name of `blockswap.funcs`. The library code lives in the package."""
from blockswap.funcs import (  # noqa: F401 (re-exported)
    Budget, QuantisedLatency, WindowCounts, budget_args, budget_window, count_genotypes,
    fisher_scores, fraction, get_no_params, load_genotype, one_shot_fisher, sample_codes,
    sample_genotypes, save_genotype, scoring_mode)
