"""Network families by name: the one table every script builds networks and cost tables from.

An entry says how to build a network of the family from a genotype, where its residual blocks
sit (each block's channels, stride and input size: what the cost and latency tables price), its
input size, its default class count and the data sets it is the default for. Adding a family is
one `register_arch` call; `--arch` offers every registered name.

    net = Network("wrn", depth=16, width=2, num_classes=10)
    model = net.build(["Conv", "DConvA4", ...])      # or one block name: a uniform network
    net.slots()                                       # [BlockSlot(16, 32, 1, 32), ...]
"""
import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch.nn as nn

from models.blocks import (MB_EXPANSIONS, MB_KERNELS, SEARCH_SPACE, BlockSlot, UserError,
                           load_block_module, torchvision_part)
from models.resnet import LAYERS, ResNet, resnet_slots
from models.tv_layout import (MBV2_PLAIN, RESNET_TAPS, mobilenet_v2_slots, mobilenet_v2_taps,
                              resnet_slots as tv_resnet_slots)
from models.wide_resnet import WideResNet, wrn_block_count, wrn_slots

WRN_DEPTH, WRN_WIDTH = 40, 2      # the default WRN: the paper's CIFAR teacher


@dataclass(frozen=True)
class Family:
    """A network family.

    build(convs, num_classes, depth, width) -> network; slots(depth, width, image_size) ->
    its residual blocks in genotype order; is_member(model): whether a built network is of
    this family (how a checkpoint's network is named). depth and width mean something only
    when `sized` (WRN-depth-width, read back from model.depth and model.widen_factor); the
    other families ignore them."""
    build: Callable[[object, int, int, int], nn.Module]
    slots: Callable[[int, int, int], List[BlockSlot]]
    image_size: int
    num_classes: int
    is_member: Callable[[nn.Module], bool]
    datasets: Tuple[str, ...] = ()     # data sets whose default family this is
    sized: bool = False
    # Module names (as model.named_modules() gives them) whose outputs are the stage outputs
    # attention transfer matches between teacher and student (taken with forward hooks).
    taps: Tuple[str, ...] = ()
    # The block types a search samples from by default (CostTable.for_network, fisher_rank.py).
    space: Tuple[str, ...] = SEARCH_SPACE
    # The unmodified network's genotype (Network.build()): one name for every block, or a list.
    plain: Union[str, Tuple[str, ...]] = "Conv"


def _resnet(name: str, datasets=()) -> Family:
    layers = LAYERS[name]
    return Family(lambda convs, classes, depth, width: ResNet(layers, convs, classes),
                  lambda depth, width, size: resnet_slots(layers, size), 224, 1000,
                  lambda m: isinstance(m, ResNet) and tuple(m.layers) == tuple(layers),
                  datasets, taps=tuple(f"block{g + 1}.0" for g in range(len(layers))))


ARCHS: Dict[str, Family] = {
    "wrn": Family(lambda convs, classes, depth, width: WideResNet(depth, width, convs, classes),
                  wrn_slots, 32, 10, lambda m: isinstance(m, WideResNet), ("cifar10", "cifar100"),
                  sized=True, taps=("block1.0", "block2.0", "block3.0")),
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34", ("imagenet",)),
}


def _made_by(arch: str) -> Callable[[nn.Module], bool]:
    """is_member of a torchvision-layout family: its networks carry their family's name."""
    return lambda m: getattr(m, "arch", None) == arch and hasattr(m, "genotype")


def _tv_resnet(arch: str) -> Family:
    """torchvision's ResNet (models/torchvision_nets.py, imported when first built): each
    3x3 takes a BlockSwap type (docs/blocks.md)."""
    build = torchvision_part("TVResNet")
    return Family(lambda convs, classes, depth, width: build(arch, convs, classes),
                  lambda depth, width, size: tv_resnet_slots(arch, size), 224, 1000,
                  _made_by(arch), taps=RESNET_TAPS)


# MobileNetV2's space: every inverted residual picks expansion 1/3/6 and kernel 3/5/7.
MBCONV_SPACE = tuple(f"MB{e}K{k}" for e in MB_EXPANSIONS for k in MB_KERNELS)
_mbv2 = torchvision_part("TVMobileNetV2")
ARCHS.update({
    "tv_resnet18": _tv_resnet("tv_resnet18"),
    "tv_resnet34": _tv_resnet("tv_resnet34"),
    "resnet50": _tv_resnet("resnet50"),
    "mobilenet_v2": Family(lambda convs, classes, depth, width: _mbv2(convs, classes),
                           lambda depth, width, size: mobilenet_v2_slots(size), 224, 1000,
                           _made_by("mobilenet_v2"), taps=mobilenet_v2_taps(),
                           space=MBCONV_SPACE, plain=MBV2_PLAIN),
})


def register_arch(name: str, family: Family) -> None:
    """Add a network family; `--arch name` then builds, prices and times it."""
    ARCHS[name] = family


def get_family(name: str) -> Family:
    try:
        return ARCHS[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r}; expected one of "
                        f"{', '.join(ARCHS)}") from None


def default_arch(dataset: str) -> str:
    """The family of a data set when none is named (ResNet-34 on ImageNet, WRN on CIFAR)."""
    return next((name for name, f in ARCHS.items() if dataset in f.datasets), "wrn")


@dataclass(frozen=True)
class Network:
    """Which network: a registered family and, for WRN, its depth and width. num_classes None:
    the family's default (10 for WRN, 1000 for the ResNets)."""
    arch: str = "wrn"
    depth: Optional[int] = WRN_DEPTH
    width: Optional[int] = WRN_WIDTH
    num_classes: Optional[int] = None

    @property
    def family(self) -> Family:
        return get_family(self.arch)

    @property
    def classes(self) -> int:
        return self.num_classes or self.family.num_classes

    @property
    def image_size(self) -> int:
        return self.family.image_size

    @property
    def name(self) -> str:
        """'WRN-40-2' or the family name."""
        return f"WRN-{self.depth}-{self.width}" if self.family.sized else self.arch

    @property
    def space(self) -> Tuple[str, ...]:
        """The family's default search space (block names)."""
        return self.family.space

    def build(self, convs=None) -> nn.Module:
        """The network with `convs` (a genotype, or one block name for a uniform network);
        None: the unmodified network (the family's `plain` genotype)."""
        plain = self.family.plain
        if convs is None:
            convs = plain if isinstance(plain, str) else list(plain)
        return self.family.build(convs, self.classes, self.depth, self.width)

    def slots(self) -> List[BlockSlot]:
        return self.family.slots(self.depth, self.width, self.image_size)

    @property
    def taps(self) -> Tuple[str, ...]:
        """Module names whose outputs are the stage outputs (attention-transfer points)."""
        return self.family.taps

    @classmethod
    def of(cls, model: nn.Module) -> "Network":
        """The Network a built model is (what a checkpoint records): the first registered
        family that claims it."""
        arch = next((name for name, f in ARCHS.items() if f.is_member(model)), None)
        if arch is None:
            raise UserError(f"{type(model).__name__} is not a network of any registered "
                            f"family ({', '.join(ARCHS)})")
        if ARCHS[arch].sized:
            return cls(arch, model.depth, model.widen_factor, model.num_classes)
        return cls(arch, None, None, model.num_classes)

    @classmethod
    def from_args(cls, args, num_classes: Optional[int] = None) -> "Network":
        """The network that --arch/--wrn_depth/--wrn_width name (see network_args). --module
        is loaded first: its file may register the family --arch names."""
        if getattr(args, "module", None):
            load_block_module(args.module)
        return cls.named(getattr(args, "arch", None), getattr(args, "dataset", ""),
                         args.wrn_depth, args.wrn_width, num_classes)

    @classmethod
    def named(cls, arch: Optional[str], dataset: str, depth: Optional[int] = None,
              width: Optional[int] = None, num_classes: Optional[int] = None) -> "Network":
        """The network of family `arch` (None: `dataset`'s default) and, for WRN, depth and
        width (None: WRN-40-2's), checked; what a settings record names."""
        arch = arch or default_arch(dataset)
        if not get_family(arch).sized:
            return cls(arch, None, None, num_classes)
        depth = WRN_DEPTH if depth is None else depth
        width = WRN_WIDTH if width is None else width
        if width < 1:
            raise UserError(f"--wrn_width must be at least 1, got {width}")
        try:
            wrn_block_count(depth)
        except UserError as e:   # named by its flag, before a network is built
            raise UserError(f"--wrn_depth {depth}: {e}") from None
        return cls(arch, depth, width, num_classes)


def wrn_width(text: str) -> int:
    """argparse type of --wrn_width: a width factor of at least 1 (checked at parse time)."""
    try:
        width = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if width < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return width


def wrn_depth(text: str) -> int:
    """argparse type of --wrn_depth: a WRN depth, 6n+4 (checked at parse time)."""
    try:
        depth = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        wrn_block_count(depth)
    except UserError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    return depth


def network_args() -> argparse.ArgumentParser:
    """The network flags every script shares (an argparse parent): --arch, --wrn_depth,
    --wrn_width, --module."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("network")
    # No argparse choices: a --module file may register the family (checked by from_args).
    g.add_argument("--arch", default=None,
                   help=f"network family: {', '.join(ARCHS)}, or one a --module file "
                        "registers (default: wrn on CIFAR, resnet34 on imagenet)")
    g.add_argument("--wrn_depth", default=None, type=wrn_depth,
                   help=f"WRN depth, 6n+4 (default {WRN_DEPTH}; a student: its teacher's)")
    g.add_argument("--wrn_width", default=None, type=wrn_width,
                   help=f"WRN width factor (default {WRN_WIDTH}; a student: its teacher's)")
    g.add_argument("--module", default=None,
                   help="Python file that calls register_block() to add block types and/or "
                        "register_arch() to add a network family")
    return p
