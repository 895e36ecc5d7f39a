"""Networks and block substitutions. models/blocks.py holds the block-type table,
models/archs.py the network-family table."""
from models.archs import (ARCHS, Family, Network, default_arch, get_family, network_args,
                          register_arch)
from models.blocks import (BLOCK_TYPES, SEARCH_SPACE, BasicBlock, BlockSlot, BottleBlock,
                           SearchBlock, UserError, build_block, get_block_type,
                           load_block_module, make_block, register_block, register_slot_kind,
                           residual_blocks)
from models.resnet import ResNet, resnet18, resnet34
from models.wide_resnet import WideResNet, wrn_block_count

__all__ = ["ARCHS", "Family", "Network", "default_arch", "get_family", "network_args",
           "register_arch", "BLOCK_TYPES", "SEARCH_SPACE", "BasicBlock", "BlockSlot",
           "BottleBlock", "SearchBlock", "UserError", "build_block", "get_block_type",
           "load_block_module", "make_block", "register_block", "register_slot_kind",
           "residual_blocks", "ResNet", "resnet18", "resnet34", "WideResNet",
           "wrn_block_count"]
