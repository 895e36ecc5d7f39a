"""Where the blocks of the torchvision-layout families sit (models/torchvision_nets.py builds
them): their slots, unmodified genotypes and attention taps, without importing torchvision."""
from typing import List

from models.blocks import BlockSlot, group_slots

# family -> (slot kind, block expansion, blocks per layer), as torchvision.models.resnet
RESNET_LAYOUT = {"tv_resnet18": ("tv_basic", 1, (2, 2, 2, 2)),
                 "tv_resnet34": ("tv_basic", 1, (3, 4, 6, 3)),
                 "resnet50": ("tv_bottleneck", 4, (3, 4, 6, 3))}
RESNET_TAPS = ("layer1", "layer2", "layer3", "layer4")

MBV2_STEM = 32
# torchvision's inverted_residual_setting: expansion t, channels c, blocks n, first stride s
MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
MBV2_PLAIN = tuple(f"MB{t}K3" for t, _, n, _ in MBV2_SETTING for _ in range(n))


def _half(size: int) -> int:
    """Output size of a stride-2 conv or pool padded to keep 'same' (k=3 p=1, k=7 p=3, ...)."""
    return (size + 1) // 2


def resnet_slots(arch: str, image_size: int = 224) -> List[BlockSlot]:
    """Every block's channels, stride and input size (the stem conv and max pool halve twice)."""
    kind, expansion, layers = RESNET_LAYOUT[arch]
    channels = [64] + [64 * 2 ** g * expansion for g in range(len(layers))]
    return group_slots(channels, layers, (1, 2, 2, 2), _half(_half(image_size)), kind)


def mobilenet_v2_slots(image_size: int = 224) -> List[BlockSlot]:
    """The 17 inverted residuals' channels, stride and input size (the stem halves the size)."""
    channels = [MBV2_STEM] + [c for _, c, _, _ in MBV2_SETTING]
    return group_slots(channels, [n for _, _, n, _ in MBV2_SETTING],
                       [s for _, _, _, s in MBV2_SETTING], _half(image_size), "mbconv")


def mobilenet_v2_taps() -> tuple:
    """The last block of each resolution (after which it halves, and the last): features.i is
    slot i - 1 (features.0 is the stem)."""
    slots = mobilenet_v2_slots()
    return tuple(f"features.{i + 1}" for i in range(len(slots))
                 if i + 1 == len(slots) or slots[i + 1].stride == 2)
