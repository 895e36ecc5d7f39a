"""Parameter and multiply-accumulate (MAC) counts.

`measure_model(model, H, W)` measures a built network with torch's FlopCounterMode
(convolutions with their groups and dilation, and linear layers; 1 MAC = 2 FLOPs).
`CostTable` gives the same two numbers for a genotype without building the network: the cost
of a network is a base (stem, final BN, classifier) plus one entry per residual block that
depends only on the block's position and type, so a table of (position x type) costs, made
once from single blocks, prices hundreds of thousands of genotypes in milliseconds.

    python count_ops.py --genotype genotypes/bs800k.csv        # WRN-40-2 unless told otherwise
"""
import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from blockswap.cli import HelpFormatter, at_least
from blockswap.files import load_genotype
from blockswap.latency import add_latency_args, print_latency, timing_from_args
from models.archs import Network, network_args
# count_params lives with the networks; it is imported here for users who take it from here.
from models.blocks import (BlockSlot, PreActivation, UserError, build_block, count_params,
                           get_block_type, residual_blocks)


@torch.no_grad()
def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of convolutions and linear layers in one forward of `module` on `x`."""
    was_training = module.training
    module.eval()  # BN in eval mode: no running-stat update from a counting pass
    with FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return int(counter.get_total_flops()) // 2


def measure_model(model: nn.Module, H: int, W: int) -> Tuple[int, int]:
    """(MACs, params) of `model` for one 3 x H x W image."""
    device = next(model.parameters()).device
    return count_macs(model, torch.zeros(1, 3, H, W, device=device)), count_params(model)


@torch.no_grad()
def paper_macs(model: nn.Module, H: int, W: int) -> Optional[int]:
    """MACs as the BlockSwap paper reports them: convolutions and linear layers, plus one op per
    element through each pre-activation ReLU of a residual block (after its `bn1`/`bn2`) and of
    the network's final `bn1`, plus one per element average-pooled. (ReLUs inside the cheap
    convs are not counted.) Reproduces the paper's 328.3M for WRN-40-2 and its student figures.
    None for a network whose blocks are not pre-activation ones (the torchvision families):
    the paper counted none of those.
    """
    if not all(isinstance(b, PreActivation) for b in residual_blocks(model)):
        return None
    bns = [b.bn1 for b in residual_blocks(model)]
    bns += [b.bn2 for b in residual_blocks(model) if hasattr(b, "bn2")]
    if isinstance(getattr(model, "bn1", None), nn.BatchNorm2d):
        bns.append(model.bn1)
    seen = []
    hooks = [bn.register_forward_hook(lambda m, i, o: seen.append(o.numel())) for bn in bns]
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, H, W, device=next(model.parameters()).device)
        with FlopCounterMode(display=False) as counter:
            _, acts = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(counter.get_total_flops()) // 2 + sum(seen) + acts[-1].numel()


# --------------------------------------------------------------------------------------------
# Analytic costs of genotypes.
# --------------------------------------------------------------------------------------------

def block_cost(name: str, slot: BlockSlot) -> Tuple[int, int]:
    """(params, MACs) of one residual block of type `name` at `slot`. Built on the meta device
    (shapes only: initialising ResNet-50's wide layers took most of its table's time), then
    given uninitialised CPU memory to run on: values do not change the counts."""
    with torch.device("meta"):
        block = build_block(name, slot)
    block = block.to_empty(device="cpu")
    x = torch.zeros(1, slot.in_planes, slot.size, slot.size)
    return count_params(block), count_macs(block, x)


class CostTable:
    """Costs of every (position, block type) of one network family.

    params[i, t] and macs[i, t] are the costs of block type names[t] at position i;
    cost(genotype) = base + sum over positions. Built from single blocks, so it is exact.
    """

    latency = None   # fisher_rank sets a latency.QuantisedLatency on a copy for a latency goal

    def __init__(self, slots: List[BlockSlot], base_net: nn.Module, image_size: int,
                 names: Sequence[str]):
        self.names = list(names)
        self.index = {n: t for t, n in enumerate(self.names)}
        for n in self.names:
            get_block_type(n)
        cache: Dict[Tuple[str, BlockSlot], Tuple[int, int]] = {}
        for slot in set(slots):
            for n in self.names:
                cache[n, slot] = block_cost(n, slot)
        self.params = np.array([[cache[n, s][0] for n in self.names] for s in slots], np.int64)
        self.macs = np.array([[cache[n, s][1] for n in self.names] for s in slots], np.int64)
        # The base is what a built network (base_net) costs beyond its blocks.
        macs, params = measure_model(base_net, image_size, image_size)
        own = [cache.get((n, s)) or block_cost(n, s) for n, s in zip(base_net.genotype, slots)]
        self.base_params = params - sum(c[0] for c in own)
        self.base_macs = macs - sum(c[1] for c in own)

    @classmethod
    def for_network(cls, net: Network, names: Optional[Sequence[str]] = None):
        """The table of a registered network (models.archs): its slots, its input size, its
        unmodified network as the base; names None: the family's search space."""
        return cls(net.slots(), net.build(), net.image_size, net.space if names is None else names)

    @property
    def n_positions(self) -> int:
        return self.params.shape[0]

    def encode(self, genotype: Sequence[str]) -> np.ndarray:
        """Genotype -> array of type indices into `names`."""
        if len(genotype) != self.n_positions:
            raise UserError(f"genotype has {len(genotype)} block types but the network has "
                            f"{self.n_positions} residual blocks")
        try:
            return np.array([self.index[n] for n in genotype], np.int64)
        except KeyError as e:
            get_block_type(e.args[0])  # unknown anywhere: the listing error
            raise UserError(f"block type {e.args[0]!r} is not in this search space: "
                            + ", ".join(self.names)) from None

    def cost(self, genotype: Sequence[str]) -> Tuple[int, int]:
        """(params, MACs) of a genotype."""
        idx = self.encode(genotype)
        pos = np.arange(self.n_positions)
        return (int(self.base_params + self.params[pos, idx].sum()),
                int(self.base_macs + self.macs[pos, idx].sum()))

    def cost_many(self, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Vectorised costs of an (N, positions) array of type indices."""
        pos = np.arange(self.n_positions)
        return (self.base_params + self.params[pos, codes].sum(1),
                self.base_macs + self.macs[pos, codes].sum(1))


def get_args_parser():
    p = argparse.ArgumentParser(description="Parameters and MACs of a network or genotype.",
                                formatter_class=HelpFormatter, parents=[network_args()])
    p.add_argument("--genotype", help="genotype CSV (default: a uniform network of --conv)")
    p.add_argument("--conv", default=None,
                   help="block type of a uniform network (default: the unmodified network)")
    p.add_argument("--num_classes", default=None, type=at_least(1),
                   help="classifier outputs (default: 10 for wrn, 1000 for resnets)")
    p.add_argument("--latency", action="store_true",
                   help="also the table's predicted and the measured inference latency")
    add_latency_args(p)
    p.add_argument("--latency_dir", default="results/latency", help="latency table cache")
    return p


def main(args):
    net = Network.from_args(args, args.num_classes)
    if args.latency:
        timing_from_args(args)   # a bad --latency_device etc., before any work
    model = net.build(load_genotype(args.genotype) if args.genotype else args.conv)
    size = net.image_size
    macs, params = measure_model(model, size, size)
    paper = paper_macs(model, size, size)
    paper = "" if paper is None else f"; {paper:,} as the paper counts"
    print(f"params {params:,}  MACs {macs:,} (conv+linear{paper})  "
          f"blocks {len(residual_blocks(model))}")
    if args.latency:
        print_latency(args, net, model, args.latency_dir)
    return macs, params

