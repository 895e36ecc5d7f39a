"""Networks and block substitutions. See models/blocks.py for the block-type table."""
from models.blocks import (BLOCK_TYPES, SEARCH_SPACE, BasicBlock, BottleBlock, UserError,
                           get_block_type, load_block_module, make_block, register_block,
                           residual_blocks)
from models.resnet import ResNet, resnet18, resnet34
from models.wide_resnet import WideResNet, wrn_block_count

__all__ = ["BLOCK_TYPES", "SEARCH_SPACE", "BasicBlock", "BottleBlock", "UserError",
           "get_block_type", "load_block_module", "make_block", "register_block",
           "residual_blocks", "ResNet", "resnet18", "resnet34", "WideResNet", "wrn_block_count",
           "default_arch"]


def default_arch(dataset: str) -> str:
    """The network family of a data set when none is named: ResNet-34 on ImageNet, else WRN."""
    return "resnet34" if dataset == "imagenet" else "wrn"
