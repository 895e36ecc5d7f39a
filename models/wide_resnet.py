"""Wide ResNet for CIFAR (Zagoruyko & Komodakis), with one block type per residual block."""
from typing import List

import torch.nn as nn
import torch.nn.functional as F

from models.blocks import (BlockSlot, Head, NetworkBlock, UserError, check_genotype,
                           group_slots, init_weights)


def wrn_block_count(depth: int) -> int:
    """Residual blocks in a WRN of this depth: (depth - 4) / 6 per group, 3 groups."""
    if depth < 10 or (depth - 4) % 6:
        raise UserError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    return 3 * ((depth - 4) // 6)


def wrn_channels(width: int):
    """Channels of the stem and the three groups of a WRN of this width."""
    return [16, 16 * width, 32 * width, 64 * width]


def wrn_slots(depth: int, width: int, image_size: int = 32) -> List[BlockSlot]:
    """Every residual block's channels, stride and input size, in genotype order."""
    n = wrn_block_count(depth) // 3
    return group_slots(wrn_channels(width), [n, n, n], [1, 2, 2], image_size)


class WideResNet(nn.Module):
    """WRN-depth-width. `convs` is a genotype (one block name per residual block) or one name.

    forward(x) -> (logits, [output of group 1, group 2, group 3]) for attention transfer.
    """

    def __init__(self, depth, widen_factor, convs="Conv", num_classes=10, dropRate=0.0):
        super().__init__()
        n_blocks = wrn_block_count(depth)
        n = n_blocks // 3
        self.genotype = check_genotype(convs, n_blocks, f"WRN-{depth}-{widen_factor}")
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        ch = wrn_channels(widen_factor)

        self.conv1 = nn.Conv2d(3, ch[0], 3, padding=1, bias=False)
        # ModuleLists of one NetworkBlock keep the original's `block1.0.layer.j` keys.
        self.block1 = nn.ModuleList([NetworkBlock(ch[0], ch[1], 1, self.genotype[:n], dropRate)])
        self.block2 = nn.ModuleList([NetworkBlock(ch[1], ch[2], 2, self.genotype[n:2 * n], dropRate)])
        self.block3 = nn.ModuleList([NetworkBlock(ch[2], ch[3], 2, self.genotype[2 * n:], dropRate)])
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        init_weights(self)

    def fixed_parts(self):
        """(stem, head): the modules before the first and after the last residual block."""
        return self.conv1, Head(self.bn1, self.fc)

    def forward(self, x):
        activations = []
        out = self.conv1(x)
        for group in (self.block1, self.block2, self.block3):
            out = group[0](out)
            activations.append(out)
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)   # = avg_pool2d(out, 8) on 32x32 input
        return self.fc(out), activations
