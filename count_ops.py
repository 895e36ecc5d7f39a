"""Parameters and MACs of a network or a genotype (the seed's count_ops.py).

    python count_ops.py --genotype genotypes/bs800k.csv        # WRN-40-2 unless told otherwise

The code lives in blockswap/count_ops.py; the seed's `count_ops.measure_model(model, H, W)`
and the cost table stay importable from here."""
from blockswap.cli import run_cli
from blockswap.count_ops import (  # noqa: F401 (re-exported)
    CostTable, block_cost, count_macs, get_args_parser, main, measure_model, paper_macs)

if __name__ == "__main__":
    run_cli(main, get_args_parser())
