"""The model zoo: every block type runs, keys match the original code, counts are exact."""
import csv
import os

import pytest
import torch
import torch.nn as nn

from blockswap.count_ops import CostTable, count_params, measure_model, paper_macs
from models import (BLOCK_TYPES, SEARCH_SPACE, Network, ResNet, UserError, WideResNet,
                    register_block, residual_blocks, resnet34)

from models.blocks import BLOCK_TYPES as TABLE, load_block_module

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_every_block_type_forward_backward(name):
    torch.manual_seed(0)
    net = WideResNet(10, 2, name)                # 3 residual blocks, widths 32/64/128
    x = torch.randn(2, 3, 32, 32)
    logits, acts = net(x)
    assert logits.shape == (2, 10)
    assert [a.shape[1:] for a in acts] == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.genotype == [name] * 3


def _uniform_table():
    with open(os.path.join(HERE, "wrn_40_2_uniform_costs.csv")) as f:
        return {r["name"]: (int(r["params"]), int(r["macs"])) for r in csv.DictReader(f)}


def test_uniform_wrn_40_2_counts_pinned():
    """Every block type in a uniform WRN-40-2 against the checked-in table (pycls style)."""
    table = _uniform_table()
    assert set(table) == set(BLOCK_TYPES)
    for name, (params, macs) in table.items():
        assert measure_model(WideResNet(40, 2, name), 32, 32) == (macs, params), name


@pytest.mark.parametrize("depth,width,params", [
    (40, 2, 2_243_546), (16, 2, 691_674), (40, 1, 563_930), (16, 1, 175_066)])
def test_wrn_parameter_counts(depth, width, params):
    assert count_params(WideResNet(depth, width)) == params


def _conv(ci, co, k=3, groups=1):
    return k * k * ci * co // groups


def _independent_wrn_params(depth, width, block):
    """Parameters of a uniform WRN written out from the architecture, layer by layer."""
    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    total = _conv(3, 16) + 2 * ch[3] + ch[3] * 10 + 10         # stem, final BN, fc
    for g in range(3):
        for i in range(n):
            ci, co = (ch[g] if i == 0 else ch[g + 1]), ch[g + 1]
            total += 2 * ci + (ci * co if ci != co else 0)      # bn1 and 1x1 shortcut
            total += block(ci, co)
    return total


def test_params_against_independent_formula():
    conv = lambda ci, co: _conv(ci, co) + 2 * co + _conv(co, co)
    dconv = lambda ci, co: (9 * ci + 2 * ci + ci * co) + 2 * co + (9 * co + 2 * co + co * co)

    def g8b2(ci, co):
        m = co // 2
        return ci * m + 2 * m + _conv(m, m, groups=m // 8) + 2 * m + m * co

    for block, name in [(conv, "Conv"), (dconv, "DConv"), (g8b2, "G8B2")]:
        for depth, width in [(40, 2), (16, 1)]:
            assert count_params(WideResNet(depth, width, name)) == \
                _independent_wrn_params(depth, width, block), (name, depth, width)


def _paper_table():
    return {"bs150k": (162.2, 33.9), "bs200k": (217.0, 38.8), "bs250k": (289.2, 65.9),
            "bs400k": (404.2, 92.8), "bs500k": (556.0, 89.5), "bs800k": (811.4, 132.5)}


def test_paper_genotypes_match_reported_figures():
    from blockswap.funcs import load_genotype
    for name, (kparams, mmacs) in _paper_table().items():
        net = WideResNet(40, 2, load_genotype(os.path.join(HERE, "..", "genotypes",
                                                           name + ".csv")))
        assert abs(count_params(net) / 1e3 - kparams) < 0.06, name     # paper rounds
        assert abs(paper_macs(net, 32, 32) / 1e6 - mmacs) < 0.06, name   # paper rounds
    assert round(paper_macs(WideResNet(40, 2), 32, 32) / 1e6, 1) == 328.3


def test_measure_model_against_hook_count():
    """MACs from FlopCounterMode vs an independent count with forward hooks."""
    torch.manual_seed(0)
    net = WideResNet(10, 2, ["DConvA4", "G8B2", "Conv2x2"])
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            total[0] += m.in_features * m.out_features * out.shape[0]
        else:  # each output element: (in / groups) * prod(kernel) multiply-adds
            per = m.in_channels // m.groups * int(torch.tensor(m.kernel_size).prod())
            total[0] += out.numel() * per
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            m.register_forward_hook(hook)
    macs, params = measure_model(net, 32, 32)
    assert macs == total[0]
    assert params == sum(p.numel() for p in net.parameters())


def test_cost_table_equals_built_networks():
    g = torch.Generator().manual_seed(1)
    table = CostTable.for_network(Network("wrn", 16, 2, 10))
    for _ in range(5):
        geno = [SEARCH_SPACE[i] for i in torch.randint(len(SEARCH_SPACE), (6,), generator=g)]
        assert table.cost(geno) == measure_model(WideResNet(16, 2, geno), 32, 32)[::-1]
    codes = torch.randint(len(SEARCH_SPACE), (4, 6), generator=g).numpy()
    params, macs = table.cost_many(codes)
    for row, p, m in zip(codes, params, macs):
        assert table.cost([SEARCH_SPACE[i] for i in row]) == (p, m)


def test_resnet34_genotypes():
    from blockswap.funcs import load_genotype
    net = resnet34(load_genotype(os.path.join(HERE, "..", "genotypes", "bs_imagenet_1.csv")))
    assert len(residual_blocks(net)) == 16
    assert round(count_params(net) / 1e6, 1) == 3.1          # the paper's ~3.1M student
    table = CostTable.for_network(Network("resnet34", None, None, 1000))
    assert table.cost(net.genotype) == measure_model(net, 224, 224)[::-1]
    small = ResNet((1, 1, 1, 1), ["Conv", "DConvG4", "G4B2", "ConvB2"], num_classes=7)
    logits, acts = small(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7) and len(acts) == 4


def _original_keys(genotype):
    """State-dict keys the original BlockSwap code gives a WRN-16-2 of this genotype."""
    slot = {"Conv": ["conv"], "DConvA4": ["convdw", "bn", "conv1x1"],
            "G8B2": ["conv1x1_down", "bn1", "conv", "bn2", "conv1x1_up"],
            "DConvB4": ["conv1x1_down", "bn1", "convdw", "bn2", "conv1x1_up"]}
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"]
    for i, name in enumerate(genotype):
        p = f"block{i // 2 + 1}.0.layer.{i % 2}."
        bottle = name in ("G8B2", "DConvB4")
        parts = [("bn1", None), ("conv1", name)] + ([] if bottle else [("bn2", None), ("conv2", name)])
        for mod, conv in parts:
            if conv is None:
                keys += [p + mod + "." + b for b in bn]
            else:
                for s in slot[conv]:
                    keys += [p + f"{mod}.{s}." + b for b in bn] if s.startswith("bn") \
                        else [p + f"{mod}.{s}.weight"]
        if i % 2 == 0:
            keys.append(p + "convShortcut.weight")
    keys += ["bn1." + b for b in bn] + ["fc.weight", "fc.bias"]
    return keys


def test_state_dict_keys_match_original():
    geno = ["Conv", "DConvA4", "G8B2", "DConvB4", "Conv", "G8B2"]
    assert sorted(WideResNet(16, 2, geno).state_dict()) == sorted(_original_keys(geno))


def test_state_dict_round_trip_strict(tmp_path):
    geno = ["A4B2", "DConvG2", "Conv", "ConvB4", "DConv", "G2B4"]
    a = WideResNet(16, 1, geno)
    a(torch.randn(4, 3, 32, 32))                     # move BN running stats off init
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = WideResNet(16, 1, geno)
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    a.eval(), b.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x)[0], b(x)[0])


def test_unknown_block_name_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown block type 'DConvA3'; valid names: Conv, "):
        WideResNet(16, 2, ["Conv"] * 5 + ["DConvA3"])


def test_wrong_genotype_length_names_both():
    with pytest.raises(UserError, match=r"17 block types but WRN-40-2 has 18"):
        WideResNet(40, 2, ["Conv"] * 17)
    with pytest.raises(UserError, match="6n\\+4"):
        WideResNet(41, 2)


def test_register_user_block_from_module(tmp_path):
    path = tmp_path / "myblocks.py"
    path.write_text(
        "import torch.nn as nn\n"
        "from models.blocks import register_block\n"
        "class Shift(nn.Module):\n"
        "    def __init__(self, i, o, stride=1):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(i, o, 1, stride=stride, bias=False)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
        "register_block('TestShift1x1', Shift, bottle=True)\n")
    try:
        load_block_module(str(path))
        net = WideResNet(10, 1, "TestShift1x1")
        assert net(torch.randn(1, 3, 32, 32))[0].shape == (1, 10)
        # one BottleBlock per position: bn1 + 1x1 conv (+ shortcut in the first block)
        assert count_params(net.block2[0].layer[0]) == 2 * 16 + 16 * 32 + 16 * 32
        load_block_module(str(path))               # the same file again: allowed
        with pytest.raises(UserError, match="already registered"):
            register_block("TestShift1x1", nn.Identity)
        with pytest.raises(UserError, match="already registered"):
            register_block("Conv", nn.Identity)
    finally:
        TABLE.pop("TestShift1x1", None)
    with pytest.raises(UserError, match="no such file"):
        load_block_module(str(tmp_path / "missing.py"))


def test_a_registered_family_is_built_priced_and_named_back():
    """Adding a network family is one register_arch entry: it builds, its cost table equals
    its built networks, and a built network (a checkpoint's) is named back to it."""
    from blockswap.files import arch_info, model_from_checkpoint
    from models import ARCHS, Family, Network, register_arch
    from models.resnet import resnet_slots
    layers = (1, 1, 1, 1)
    register_arch("resnet1111", Family(
        lambda convs, classes, depth, width: ResNet(layers, convs, classes),
        lambda depth, width, size: resnet_slots(layers, size), 64, 7,
        lambda m: isinstance(m, ResNet) and tuple(m.layers) == layers))
    try:
        net = Network("resnet1111", None, None)
        genotype = ["Conv", "DConvA4", "G8B2", "ConvB2"]
        model = net.build(genotype)
        assert len(net.slots()) == 4 and model.fc.out_features == 7
        table = CostTable.for_network(net, names=sorted(set(genotype)))
        assert table.cost(genotype) == tuple(reversed(measure_model(model, 64, 64)))
        assert Network.of(model) == Network("resnet1111", None, None, 7)
        ckpt = {"net": model.state_dict(), **arch_info(model)}
        assert ckpt["arch"] == "resnet1111"
        assert model_from_checkpoint(ckpt, "x.t7").genotype == genotype
        with pytest.raises(UserError, match="not a network of any registered family"):
            Network.of(nn.Linear(2, 2))
    finally:
        ARCHS.pop("resnet1111", None)
