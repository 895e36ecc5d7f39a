"""Pre-activation ResNet for ImageNet built from the same residual blocks, as the original
BlockSwap code (stem conv-BN-ReLU-maxpool, four groups, global average pool, no final BN)."""
from typing import List, Sequence

import torch.nn as nn
import torch.nn.functional as F

from models.blocks import (BlockSlot, Head, NetworkBlock, check_genotype, group_slots,
                           init_weights)

LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
CHANNELS = (64, 64, 128, 256, 512)


def resnet_slots(layers: Sequence[int], image_size: int = 224) -> List[BlockSlot]:
    """Every residual block's channels, stride and input size (the stem divides by 4)."""
    return group_slots(CHANNELS, list(layers), [1, 2, 2, 2], image_size // 4)


class ResNet(nn.Module):
    """forward(x) -> (logits, [output of each of the 4 groups])."""

    def __init__(self, layers=(3, 4, 6, 3), convs="Conv", num_classes=1000,
                 nChannels=CHANNELS):
        super().__init__()
        layers = tuple(layers)
        self.layers, self.num_classes = layers, num_classes
        self.genotype = check_genotype(convs, sum(layers), f"ResNet{tuple(layers)}")
        ch = nChannels

        self.conv1 = nn.Conv2d(3, ch[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(ch[0])
        self.mpool = nn.MaxPool2d(3, stride=2, padding=1)
        start = 0
        for g, n in enumerate(layers):
            group = NetworkBlock(ch[g], ch[g + 1], 1 if g == 0 else 2,
                                 self.genotype[start:start + n])
            setattr(self, f"block{g + 1}", nn.ModuleList([group]))
            start += n
        self.fc = nn.Linear(ch[-1], num_classes)
        init_weights(self)

    def fixed_parts(self):
        """(stem, head): the modules before the first and after the last residual block."""
        return nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.mpool), Head(None, self.fc)

    def forward(self, x):
        activations = []
        out = self.mpool(F.relu(self.bn1(self.conv1(x))))
        for g in range(len(self.layers)):
            out = getattr(self, f"block{g + 1}")[0](out)
            activations.append(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)   # = avg_pool2d(out, 7) at 224x224
        return self.fc(out), activations


def resnet18(convs="Conv", num_classes=1000):
    return ResNet(LAYERS["resnet18"], convs, num_classes)


def resnet34(convs="Conv", num_classes=1000):
    return ResNet(LAYERS["resnet34"], convs, num_classes)
