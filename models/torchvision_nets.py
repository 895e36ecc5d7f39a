"""torchvision's ResNets and MobileNetV2 as BlockSwap families, key for key with torchvision.

Built on torchvision's own classes: only the searched parts change, so the unmodified network
(`Network("resnet50").build()`) loads `torchvision.models.resnet50().state_dict()` with
strict=True and computes the same logits.

- ResNet (`tv_resnet18`, `tv_resnet34`, `resnet50`): each block's 3x3 convolutions (a
  BasicBlock's two, a Bottleneck's one) become the genotype's block type; `Conv` keeps
  torchvision's own 3x3 (and its state-dict key); the 1x1s, BNs and shortcuts stay.
- MobileNetV2 (`mobilenet_v2`): each of the 17 inverted residuals is the genotype's `MB<e>K<k>`
  type (expansion e, k x k depthwise), with torchvision's stride and channels at that place.

Importing this module imports torchvision (seconds); models.blocks.torchvision_part reaches it
lazily, so scripts on WRN never pay for it.
"""
from typing import Sequence

import torch.nn as nn
from torch import Tensor
from torchvision.models import mobilenetv2 as tv_mobilenet
from torchvision.models import resnet as tv_resnet

from models.blocks import BlockSlot, SearchBlock, UserError, check_genotype, get_block_type
from models.tv_layout import MBV2_PLAIN, RESNET_LAYOUT

KEEP = "Conv"   # the block type torchvision's layers already are: keep them (and their keys)


def tv_init(module: nn.Module) -> None:
    """torchvision's ResNet/MobileNetV2 init, for modules made after the network's own init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _SwapsConvs:
    """A torchvision residual block whose 3x3 convolutions (SEARCHED) take a block type."""
    SEARCHED: Sequence[str] = ()

    def swap(self, name: str) -> None:
        build = get_block_type(name).build
        if name == KEEP:
            return
        for attr in self.SEARCHED:
            old = getattr(self, attr)
            new = build(old.in_channels, old.out_channels, old.stride[0])
            tv_init(new)
            setattr(self, attr, new)


class TVBasicBlock(_SwapsConvs, tv_resnet.BasicBlock, SearchBlock):
    """torchvision's BasicBlock; both 3x3s take the block type."""
    SEARCHED = ("conv1", "conv2")

    @property
    def branch_end(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        # torchvision's forward with the shortcut added out of place: Fisher potential keeps
        # bn2's output (the branch), which torchvision's `out += identity` would overwrite.
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVBottleneck(_SwapsConvs, tv_resnet.Bottleneck, SearchBlock):
    """torchvision's Bottleneck; its 3x3 (conv2) takes the block type, the 1x1s stay dense."""
    SEARCHED = ("conv2",)

    @property
    def branch_end(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)   # see TVBasicBlock
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class MBConv(tv_mobilenet.InvertedResidual, SearchBlock):
    """torchvision's InvertedResidual (expansion e; residual when stride 1 and in == out) with
    a k x k depthwise convolution; the state-dict keys are torchvision's for every k."""

    def __init__(self, in_planes, out_planes, stride=1, expansion=6, kernel=3):
        super().__init__(in_planes, out_planes, stride, expansion)
        if kernel != 3:
            dw = self.conv[-3][0]    # [pw,] dw, pw-linear, BN: the dw Conv2dNormActivation's conv
            self.conv[-3][0] = nn.Conv2d(dw.in_channels, dw.out_channels, kernel, stride,
                                         kernel // 2, groups=dw.groups, bias=False)
        tv_init(self)

    @property
    def branch_end(self) -> nn.Module:
        return self.conv


# --------------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------------

BLOCK_OF_KIND = {"tv_basic": TVBasicBlock, "tv_bottleneck": TVBottleneck}


def _downsample(slot: BlockSlot):
    """torchvision's shortcut: a strided 1x1 and BN where the shape changes."""
    if slot.stride == 1 and slot.in_planes == slot.out_planes:
        return None
    return nn.Sequential(tv_resnet.conv1x1(slot.in_planes, slot.out_planes, slot.stride),
                         nn.BatchNorm2d(slot.out_planes))


def _resnet_block_at(cls):
    def build(name: str, slot: BlockSlot) -> nn.Module:
        block = cls(slot.in_planes, slot.out_planes // cls.expansion, slot.stride,
                    _downsample(slot))
        tv_init(block)
        block.swap(name)
        return block
    return build


basic_block_at = _resnet_block_at(TVBasicBlock)
bottleneck_at = _resnet_block_at(TVBottleneck)


class TVResNet(tv_resnet.ResNet):
    """torchvision's ResNet with each block's 3x3s of the genotype's types; forward -> logits."""

    def __init__(self, arch: str, convs=KEEP, num_classes: int = 1000):
        kind, _, layers = RESNET_LAYOUT[arch]
        block = BLOCK_OF_KIND[kind]
        genotype = check_genotype(convs, sum(layers), arch)
        names = iter(genotype)

        def make(*args, **kwargs):    # torchvision's _make_layer calls it block by block
            made = block(*args, **kwargs)
            made.swap(next(names))
            return made
        make.expansion = block.expansion
        super().__init__(make, list(layers), num_classes=num_classes)
        self.arch, self.genotype, self.num_classes = arch, genotype, num_classes

    def fixed_parts(self):
        """(stem, head): the modules before the first and after the last residual block."""
        return (nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool),
                nn.Sequential(self.avgpool, nn.Flatten(1), self.fc))


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------

def mbconv_at(name: str, slot: BlockSlot) -> nn.Module:
    """The block type `name` as a whole inverted-residual position (an MB<e>K<k> type)."""
    block = get_block_type(name).build(slot.in_planes, slot.out_planes, slot.stride)
    if not isinstance(block, SearchBlock):
        raise UserError(f"block type {name!r} is not a whole block: a MobileNetV2 position "
                        "takes an inverted residual (MB1K3 ... MB6K7)")
    return block


class TVMobileNetV2(tv_mobilenet.MobileNetV2):
    """torchvision's MobileNetV2 with each inverted residual of the genotype's type."""

    def __init__(self, convs=MBV2_PLAIN, num_classes: int = 1000):
        genotype = check_genotype(convs, len(MBV2_PLAIN), "mobilenet_v2")
        names = iter(genotype)

        def make(inp, oup, stride, expand_ratio, norm_layer):   # torchvision calls it in order
            return mbconv_at(next(names), BlockSlot(inp, oup, stride, 0, "mbconv"))
        super().__init__(num_classes=num_classes, block=make)
        self.arch, self.genotype, self.num_classes = "mobilenet_v2", genotype, num_classes

    def fixed_parts(self):
        """(stem, head): the modules before the first and after the last residual block."""
        return (self.features[0],
                nn.Sequential(self.features[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                              self.classifier))

