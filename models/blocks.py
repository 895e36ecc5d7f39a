"""Cheap convolutions ("block types") that BlockSwap substitutes into a network, and the
residual blocks that hold them.

A block type is a row of data in BLOCK_TYPES, keyed by the name the original BlockSwap code
used (`Conv`, `DConvA4`, `G8B2`, ...). A genotype is a plain list of those names, one per
residual block. Module attribute names (`conv`, `convdw`, `bn`, `conv1x1`, `conv1x1_down`, ...)
are those of the original code, so its state dicts load with strict=True.
"""
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(ValueError):
    """An error the user caused (bad name, path, budget...). CLIs print it as one line."""


# --------------------------------------------------------------------------------------------
# The conv-slot modules. Each is built as cls(in_planes, out_planes, stride, **row_arguments).
# --------------------------------------------------------------------------------------------

def resolve_groups(channels: int, groups) -> int:
    """Turn a table's group rule into a group count for `channels` channels.

    ('count', g): g groups (the original's `A` variants); ('size', g): groups of g channels
    (the `G` variants, groups = channels // g); 'dw': depthwise; None: dense.
    Where the original would crash (more groups than channels, or a group larger than the
    layer, e.g. G16B4 on 8 bottleneck channels) the count is clamped into [1, channels];
    channels and g are powers of two, so the clamped count still divides channels.
    """
    if groups is None:
        return 1
    if groups == "dw":
        return channels
    rule, g = groups
    count = g if rule == "count" else channels // g
    return max(1, min(count, channels))


class Conv(nn.Module):
    """A dense k x k convolution (k=3; `Conv2x2` is a dilated 2x2)."""

    def __init__(self, in_planes, out_planes, stride=1, kernel_size=3, padding=1, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, bias=False)

    def forward(self, x):
        return self.conv(x)


class SepConv(nn.Module):
    """Separable conv: grouped 3x3 (`convdw`), BN, ReLU, pointwise 1x1 (`conv1x1`)."""

    def __init__(self, in_planes, out_planes, stride=1, groups="dw"):
        super().__init__()
        self.convdw = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, bias=False,
                                groups=resolve_groups(in_planes, groups))
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv1x1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return self.conv1x1(F.relu(self.bn(self.convdw(x))))


class SepConv3D(nn.Module):
    """`DConv3D`: depthwise 3x3, BN, ReLU, then the 1x1 approximated by a (3,1,1) Conv3d."""

    def __init__(self, in_planes, out_planes, stride=1):
        super().__init__()
        self.convdw = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, bias=False,
                                groups=in_planes)
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv3d = nn.Conv3d(1, out_planes, kernel_size=(3, 1, 1), padding=(1, 0, 0),
                                bias=False)

    def forward(self, x):
        o = F.relu(self.bn(self.convdw(x))).unsqueeze(1)  # (n, 1, c, h, w)
        return self.conv3d(o).mean(2)                      # (n, out, h, w)


class Bottleneck(nn.Module):
    """1x1 down to out/b, BN, ReLU, grouped 3x3, BN, ReLU, 1x1 up (no BN after the last conv).

    The 3x3 is called `convdw` when depthwise (DConvB*), `conv` otherwise, as in the original.
    """

    def __init__(self, in_planes, out_planes, stride=1, bottleneck=2, groups=None):
        super().__init__()
        mid = out_planes // bottleneck
        self.conv1x1_down = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        conv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False,
                         groups=resolve_groups(mid, groups))
        self.conv_name = "convdw" if groups == "dw" else "conv"
        setattr(self, self.conv_name, conv)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv1x1_up = nn.Conv2d(mid, out_planes, 1, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1x1_down(x)))
        out = F.relu(self.bn2(getattr(self, self.conv_name)(out)))
        return self.conv1x1_up(out)


def torchvision_part(attr: str) -> Callable:
    """A callable of models/torchvision_nets.py, imported on first call: torchvision takes
    seconds to import, and only the torchvision-layout families and MBConv types need it."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module("models.torchvision_nets"), attr)(*args, **kwargs)
    return call


# --------------------------------------------------------------------------------------------
# The table of block types.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockType:
    name: str
    build: Callable[..., nn.Module]   # build(in_planes, out_planes, stride) -> conv-slot module
    bottle: bool                      # True: a single-conv BottleBlock holds it; else BasicBlock
    meaning: str


def _row(name, cls, bottle, meaning, **kwargs):
    def build(in_planes, out_planes, stride=1):
        return cls(in_planes, out_planes, stride, **kwargs)
    return name, BlockType(name, build, bottle, meaning)


def _builtin_rows():
    rows = [
        _row("Conv", Conv, False, "standard 3x3 conv"),
        _row("Conv2x2", Conv, False, "dilated 2x2 conv", kernel_size=2, dilation=2),
        _row("DConv", SepConv, False, "depthwise-separable 3x3 + 1x1", groups="dw"),
        _row("DConv3D", SepConv3D, False, "depthwise 3x3 + (3,1,1) conv3d"),
    ]
    sizes = (2, 4, 8, 16)
    rows += [_row(f"DConvG{g}", SepConv, False, f"separable, groups of {g} channels",
                  groups=("size", g)) for g in sizes]
    rows += [_row(f"DConvA{g}", SepConv, False, f"separable, {g} groups",
                  groups=("count", g)) for g in sizes]
    rows += [_row(f"ConvB{b}", Bottleneck, True, f"bottleneck /{b}, dense 3x3",
                  bottleneck=b) for b in sizes]
    rows += [_row(f"DConvB{b}", Bottleneck, True, f"bottleneck /{b}, depthwise 3x3",
                  bottleneck=b, groups="dw") for b in sizes]
    rows += [_row(f"A{g}B2", Bottleneck, True, f"bottleneck /2, 3x3 in {g} groups",
                  bottleneck=2, groups=("count", g)) for g in sizes]
    rows += [_row(f"G{g}B{b}", Bottleneck, True, f"bottleneck /{b}, 3x3 in groups of {g} channels",
                  bottleneck=b, groups=("size", g)) for b in (2, 4) for g in sizes]
    # MobileNetV2's inverted residual (torchvision's, with its residual when the shape allows)
    # at expansion e and a k x k depthwise conv: the ProxylessNAS/MnasNet space.
    rows += [_row(f"MB{e}K{k}", torchvision_part("MBConv"), False,
                  f"inverted residual, expansion {e}, depthwise {k}x{k}", expansion=e, kernel=k)
             for e in MB_EXPANSIONS for k in MB_KERNELS]
    return dict(rows)


MB_EXPANSIONS, MB_KERNELS = (1, 3, 6), (3, 5, 7)


BLOCK_TYPES: Dict[str, BlockType] = _builtin_rows()

# The block types the original search sampled from (funcs.string_to_conv and the extra
# bottlenecks its published genotypes use): the default search space of fisher_rank.py.
SEARCH_SPACE: Tuple[str, ...] = (
    "Conv", "DConv", "DConvG2", "DConvG4", "DConvG8", "DConvG16",
    "DConvA2", "DConvA4", "DConvA8", "DConvA16", "ConvB2", "ConvB4",
    "A2B2", "A4B2", "A8B2", "A16B2", "G2B2", "G4B2", "G8B2", "G16B2",
    "G2B4", "G4B4", "G8B4", "DConvB4",
)


def register_block(name: str, build: Callable[..., nn.Module], bottle: bool = False,
                   meaning: str = "user block") -> None:
    """Add a block type: build(in_planes, out_planes, stride) -> module mapping in to out."""
    old = BLOCK_TYPES.get(name)
    if old is not None and _origin(old.build) != _origin(build):
        # The same definition again (a --module file loaded twice in one process) is fine.
        raise UserError(f"block type {name!r} is already registered")
    BLOCK_TYPES[name] = BlockType(name, build, bottle, meaning)


def _origin(build) -> tuple:
    return getattr(build, "__module__", None), getattr(build, "__qualname__", repr(build))


def load_block_module(path: str) -> Tuple[str, ...]:
    """Import a user's Python file (`--module path.py`); it calls register_block() and/or
    models.register_arch(). Once per process and file version: a family's is_member must
    see the classes its networks were built from, not a second copy of them. Returns the
    block types that file defines (what a search adds to its space), however often it is
    called: block types registered by other code in this process are not the file's."""
    if not os.path.isfile(path):
        raise UserError(f"--module {path}: no such file")
    ident = f"{os.path.abspath(path)}:{os.stat(path).st_mtime_ns}"
    name = "blockswap_module_" + hashlib.sha1(ident.encode()).hexdigest()[:12]
    if name not in sys.modules:
        _exec_module(name, path)
    return tuple(n for n, t in BLOCK_TYPES.items() if _origin(t.build)[0] == name)


def _exec_module(name: str, path: str) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def get_block_type(name: str) -> BlockType:
    try:
        return BLOCK_TYPES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown block type {name!r}; valid names: "
                        + ", ".join(BLOCK_TYPES)) from None


def check_genotype(genotype, n_blocks: int, net_name: str):
    """Validate a genotype (list of names, or one name for a uniform net); return the list."""
    if isinstance(genotype, str):
        genotype = [genotype] * n_blocks
    genotype = list(genotype)
    for name in genotype:
        get_block_type(name)
    if len(genotype) != n_blocks:
        raise UserError(f"genotype has {len(genotype)} block types but {net_name} has "
                        f"{n_blocks} residual blocks")
    return genotype


# --------------------------------------------------------------------------------------------
# Residual blocks (pre-activation, as the original WRN code).
# --------------------------------------------------------------------------------------------

class SearchBlock(nn.Module):
    """The block at one searched position (one genotype entry). Subclasses have `branch_end`:
    the module whose output is the residual branch before the shortcut is added, where
    Fisher potential is taken (funcs.fisher_scores)."""


class PreActivation(SearchBlock):
    """A pre-activation residual block (the original code's): BN-ReLU before each conv."""

    def _preact(self, x):
        """Returns (shortcut input, branch input). When in != out the BN-ReLU'd input feeds both
        the branch and the 1x1 shortcut; otherwise the raw input is the identity shortcut."""
        o = F.relu(self.bn1(x))
        if self.convShortcut is None:
            return x, o
        return self.convShortcut(o), o


class BasicBlock(PreActivation):
    """BN-ReLU-conv1-BN-ReLU-conv2 with a shortcut; conv1/conv2 are conv slots of one type."""

    def __init__(self, in_planes, out_planes, stride, conv="Conv", dropRate=0.0):
        super().__init__()
        build = get_block_type(conv).build
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = build(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = build(out_planes, out_planes, 1)
        self.droprate = dropRate
        self.convShortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                             if in_planes != out_planes else None)

    @property
    def branch_end(self) -> nn.Module:
        """The module whose output is the residual branch (before the shortcut is added)."""
        return self.conv2

    def forward(self, x):
        shortcut, out = self._preact(x)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class BottleBlock(PreActivation):
    """BN-ReLU-conv1 with a shortcut; conv1 is a bottleneck type (three layers already)."""

    def __init__(self, in_planes, out_planes, stride, conv="ConvB2", dropRate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = get_block_type(conv).build(in_planes, out_planes, stride)
        self.droprate = dropRate
        self.convShortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                             if in_planes != out_planes else None)

    @property
    def branch_end(self) -> nn.Module:
        return self.conv1

    def forward(self, x):
        shortcut, out = self._preact(x)
        out = self.conv1(out)
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + out


def make_block(conv: str, in_planes: int, out_planes: int, stride: int, dropRate=0.0):
    """The residual block that holds `conv`, chosen per block as the original did."""
    cls = BottleBlock if get_block_type(conv).bottle else BasicBlock
    return cls(in_planes, out_planes, stride, conv=conv, dropRate=dropRate)


class NetworkBlock(nn.Module):
    """A group of residual blocks (`layer` keeps the original's state-dict keys)."""

    def __init__(self, in_planes, out_planes, stride, convs, dropRate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            make_block(c, in_planes if i == 0 else out_planes, out_planes,
                       stride if i == 0 else 1, dropRate)
            for i, c in enumerate(convs)])

    def forward(self, x):
        return self.layer(x)


def residual_blocks(model: nn.Module):
    """The residual blocks of a network, in genotype order: its outermost SearchBlocks (an
    MBConv type used as a WRN block's conv is part of that block, not a block of its own)."""
    found, inside = [], set()
    for m in model.modules():
        if isinstance(m, SearchBlock) and id(m) not in inside:
            found.append(m)
            inside.update(id(c) for c in m.modules())
    return found


def count_params(module: nn.Module) -> int:
    """Learned parameters as the original counts them: the state dict less BN running
    statistics, `num_batches_tracked` and masks."""
    return count_state_params(module.state_dict())


def count_state_params(state: dict) -> int:
    """count_params of a saved state dict (a checkpoint's `net`)."""
    return sum(v.numel() for k, v in state.items()
               if "running" not in k and "num_batches_tracked" not in k and "mask" not in k)


def init_weights(model: nn.Module) -> None:
    """The original's init: conv N(0, sqrt(2 / (k*k*out))), BN (1, 0), linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Block positions: what a residual block at one place of a network sees.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSlot:
    """One residual-block position: its channels, stride and input size (height = width), and
    its kind: which residual block holds the block type there (SLOT_KINDS)."""
    in_planes: int
    out_planes: int
    stride: int
    size: int
    kind: str = "preact"

    @property
    def out_size(self) -> int:
        return (self.size + self.stride - 1) // self.stride


def _preact_block(name: str, slot: BlockSlot) -> nn.Module:
    return make_block(name, slot.in_planes, slot.out_planes, slot.stride)


# How the block at a slot of each kind is built: build(block name, slot) -> the module the
# network has at that position (same parameters and MACs), what cost and latency tables price.
SLOT_KINDS: Dict[str, Callable[[str, BlockSlot], nn.Module]] = {
    "preact": _preact_block,                                     # WRN, the original ResNets
    "tv_basic": torchvision_part("basic_block_at"),              # torchvision ResNet-18/34
    "tv_bottleneck": torchvision_part("bottleneck_at"),          # torchvision ResNet-50
    "mbconv": torchvision_part("mbconv_at"),                     # torchvision MobileNetV2
}


def register_slot_kind(kind: str, build: Callable[[str, BlockSlot], nn.Module]) -> None:
    """Add a kind of block position (a user's family whose blocks are not pre-activation)."""
    SLOT_KINDS[kind] = build


def build_block(name: str, slot: BlockSlot) -> nn.Module:
    """The block of type `name` at `slot`, as the slot's network builds it."""
    try:
        build = SLOT_KINDS[slot.kind]
    except KeyError:
        raise UserError(f"unknown block slot kind {slot.kind!r}; expected one of "
                        + ", ".join(SLOT_KINDS)) from None
    return build(name, slot)


class Head(nn.Module):
    """What follows a network's last block: [BN-ReLU,] global average pool, classifier."""

    def __init__(self, bn, fc: nn.Module):
        super().__init__()
        self.bn, self.fc = bn, fc

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def group_slots(channels: Sequence[int], counts: Sequence[int], strides: Sequence[int],
                size: int, kind: str = "preact") -> List[BlockSlot]:
    """The slots of a network of groups, as NetworkBlock (or torchvision's _make_layer) builds
    them: group g has counts[g] blocks from channels[g] to channels[g + 1]; its first block
    has strides[g]; `size` is the input size of the first group; `kind` the slots' kind."""
    slots = []
    for g, (n, s) in enumerate(zip(counts, strides)):
        for i in range(n):
            slots.append(BlockSlot(channels[g] if i == 0 else channels[g + 1], channels[g + 1],
                                   s if i == 0 else 1, size, kind))
            if i == 0:
                size = slots[-1].out_size
    return slots


def logits_of(output) -> torch.Tensor:
    """Our networks return (logits, activations); plain modules return logits."""
    return output[0] if isinstance(output, (tuple, list)) else output
