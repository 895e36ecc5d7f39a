"""The torchvision-layout families (resnet50, mobilenet_v2, tv_resnet18/34): torchvision's
weights load key for key, their search spaces price genotypes exactly, Fisher potential, the
proxies and latency tables run on them, and a user's own family arrives through --module."""
import dataclasses
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision

import fisher_rank
from blockswap import latency
from blockswap.cli import run_cli
from blockswap.count_ops import CostTable, count_params, measure_model
from blockswap.files import arch_info, model_from_checkpoint
from blockswap.funcs import Budget, fisher_scores, sample_genotypes
from blockswap.proxies import get_proxy
from blockswap.search import search_space
from models import SEARCH_SPACE, Network, UserError, residual_blocks
from models.archs import ARCHS, MBCONV_SPACE

SIZE = 64          # image size of these tests (the families' own is 224)
CLASSES = 5
TORCHVISION = {"resnet50": torchvision.models.resnet50,
               "mobilenet_v2": torchvision.models.mobilenet_v2,
               "tv_resnet18": torchvision.models.resnet18,
               "tv_resnet34": torchvision.models.resnet34}
# a few of ResNet-50's 24 types keep its cost table to seconds; every MBConv type
R50_NAMES = ("Conv", "DConvA4", "G8B2", "ConvB4")


def net_of(arch):
    return Network(arch, None, None, CLASSES)


@pytest.fixture(scope="module")
def plain():
    """arch -> its unmodified network (built once: ResNet-50 takes seconds to initialise)."""
    return {arch: net_of(arch).build() for arch in ("resnet50", "mobilenet_v2")}


@pytest.fixture(scope="module")
def tables(plain):
    """arch -> its cost table at SIZE pixels."""
    out = {}
    for arch, names in (("resnet50", R50_NAMES), ("mobilenet_v2", MBCONV_SPACE)):
        slots = net_of(arch).family.slots(None, None, SIZE)
        out[arch] = CostTable(slots, plain[arch], SIZE, names)
    return out


@pytest.mark.parametrize("arch", sorted(TORCHVISION))
def test_torchvision_weights_load_strict_and_give_its_logits(arch, tmp_path):
    """A user's weights file (torchvision's constructor, random init, saved) loads with
    strict=True into the unmodified network, the logits agree, and the checkpoint's record
    names and rebuilds the network."""
    torch.manual_seed(0)
    theirs = TORCHVISION[arch](num_classes=CLASSES).eval()
    torch.save(theirs.state_dict(), tmp_path / "weights.pth")
    ours = net_of(arch).build().eval()
    ours.load_state_dict(torch.load(tmp_path / "weights.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-4
    assert Network.of(ours) == net_of(arch)
    again = model_from_checkpoint({"net": ours.state_dict(), **arch_info(ours)}, "x.t7").eval()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
    assert set(net_of(arch).taps) <= dict(ours.named_modules()).keys()


def test_unmodified_networks_have_torchvisions_published_sizes():
    with torch.device("meta"):    # shapes only: no weights to initialise
        assert count_params(Network("resnet50").build()) == 25_557_032
        assert count_params(Network("mobilenet_v2").build()) == 3_504_872


def test_taps_are_the_stage_outputs():
    """WRN and the original ResNets: the taps' outputs are the activations they return;
    MobileNetV2: the resolution halves right after every tap but the last."""
    for net, size in ((Network("wrn", 10, 1), 32), (Network("resnet18", None, None, 5), 64)):
        model = net.build().eval()
        seen = {}
        for name in net.taps:
            model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, o))
        with torch.no_grad():
            _, acts = model(torch.randn(1, 3, size, size))
        assert len(acts) == len(net.taps)
        assert all(torch.equal(seen[t], a) for t, a in zip(net.taps, acts))
    assert net_of("resnet50").taps == ("layer1", "layer2", "layer3", "layer4")
    net = net_of("mobilenet_v2")
    assert net.taps == ("features.1", "features.3", "features.6", "features.13", "features.17")
    model, sizes = net.build().eval(), {}
    for i, m in enumerate(model.features):
        m.register_forward_hook(lambda m, inp, out, i=i: sizes.__setitem__(i, out.shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    halving = [i for i in range(1, 18) if sizes[i + 1] * 2 == sizes[i]]
    assert [f"features.{i}" for i in halving] == list(net.taps[:-1])


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_sampled_genotypes_cost_exactly_what_the_built_network_counts(arch, tables, plain):
    table, net = tables[arch], net_of(arch)
    assert table.cost(plain[arch].genotype) == \
        tuple(reversed(measure_model(plain[arch], SIZE, SIZE)))
    lo = table.base_params + table.params.min(1).sum()
    hi = table.base_params + table.params.max(1).sum()
    goal = int(lo + 0.4 * (hi - lo))
    genotypes = sample_genotypes(table, 2, Budget(goal, tol=0.05), seed=1)
    for g in genotypes:
        params, macs = table.cost(g)
        assert abs(params - goal) <= 0.05 * goal
        assert (macs, params) == measure_model(net.build(g), SIZE, SIZE)
    with pytest.raises(UserError, match=f"range from {lo:,} to {hi:,}"):
        sample_genotypes(table, 1, Budget(int(lo * 0.5)))


def _mbconv_params(cin, cout, e, k):
    """An inverted residual written out: [1x1 expand + BN,] k x k depthwise + BN, 1x1 + BN."""
    h = cin * e
    return (cin * h + 2 * h if e != 1 else 0) + k * k * h + 2 * h + h * cout + 2 * cout


def test_mbconv_rows_against_the_formula(tables):
    table = tables["mobilenet_v2"]
    slots = net_of("mobilenet_v2").family.slots(None, None, SIZE)
    for i, slot in enumerate(slots):
        for t, name in enumerate(table.names):
            e, k = int(name[2]), int(name[4])
            assert table.params[i, t] == _mbconv_params(slot.in_planes, slot.out_planes, e, k)


def _reference_fisher(model, branch_names, x, y):
    """Fisher potential from a full backward with the branch outputs named by module."""
    kept = []

    def keep(module, inp, out):
        out.retain_grad()
        kept.append(out)
    for name in branch_names:
        model.get_submodule(name).register_forward_hook(keep)
    model.train()
    model.classifier[0].eval() if hasattr(model, "classifier") else None   # scoring: no dropout
    F.cross_entropy(model(x), y).backward()
    return torch.stack([0.5 * (a * a.grad).sum((2, 3)).pow(2).mean(0).sum() for a in kept])


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_fisher_potential_of_a_sampled_candidate(arch, tables, plain):
    table = tables[arch]
    g = sample_genotypes(table, 1, Budget(int(table.cost(plain[arch].genotype)[0] * 0.8),
                                          tol=0.1), seed=2)[0]
    torch.manual_seed(0)
    model = net_of(arch).build(g)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    scores = fisher_scores(model, x, y)
    assert torch.equal(scores, fisher_scores(model, x, y))    # no dropout draw in a score
    assert scores.shape == (len(g),) and torch.isfinite(scores).all() and (scores > 0).all()
    branches = ([f"layer{g_}.{i}.bn3" for g_, n in enumerate((3, 4, 6, 3), 1) for i in range(n)]
                if arch == "resnet50" else [f"features.{i}.conv" for i in range(1, 18)])
    reference = _reference_fisher(model, branches, x, y)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("arch, proxies", [("mobilenet_v2", ("naswot", "swap", "synflow")),
                                           ("resnet50", ("snip", "jacob_cov"))])
def test_proxies_score_a_sampled_candidate(arch, proxies, tables):
    g = sample_genotypes(tables[arch], 1, seed=3)[0]
    model = net_of(arch).build(g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    scores = {name: get_proxy(name)(model, x, y) for name in proxies}
    assert all(math.isfinite(v) for v in scores.values()), scores
    # MobileNetV2's only activations are ReLU6 (F.hardtanh(x, 0, 6)): seen as ReLUs, NASWOT's
    # kernel is not zero (log|det| finite, checked above) and SWAP tells inputs apart
    assert scores.get("swap", 2) > 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_each_family_searches_its_own_space_by_default(monkeypatch):
    assert Network().space == SEARCH_SPACE and net_of("resnet50").space == SEARCH_SPACE
    assert net_of("mobilenet_v2").space == MBCONV_SPACE
    assert search_space(None, None, MBCONV_SPACE) == MBCONV_SPACE
    # MobileNetV2 at 32 pixels: the same table, in less time than at 224
    monkeypatch.setitem(ARCHS, "mbv2_32", dataclasses.replace(ARCHS["mobilenet_v2"],
                                                              image_size=32))
    table = CostTable.for_network(Network("mbv2_32", None, None, CLASSES))
    assert table.names == list(MBCONV_SPACE) and table.n_positions == 17
    with pytest.raises(UserError, match="not a whole block"):
        net_of("mobilenet_v2").build("Conv")


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnxruntime",
                                                          marks=pytest.mark.slow)])
def test_latency_table_of_mobilenet_v2(runtime):
    """A latency table (eager torch; onnxruntime: every block exported, a minute or two)
    prices MobileNetV2's positions from its own blocks."""
    net = net_of("mobilenet_v2")
    model, slots = net.build(), net.family.slots(None, None, 32)
    stem, head = model.fixed_parts()
    last = slots[-1]
    timed = latency.TimedNetwork("mbv2-test", slots, 32,
                                 {"stem": ((3, 32, 32), stem),
                                  "head": ((last.out_planes, last.out_size, last.out_size), head)},
                                 net.build)
    timing = latency.Timing("cpu", 2, threads=1, clock="cpu", warmup=1, repeats=2,
                            runtime=runtime)
    table = latency.measure_table(timed, ["MB1K3", "MB6K7"], timing, show=False, calibration=1)
    assert table.ms.shape == (17, 2) and (table.ms >= 0).all()
    assert table.ms[:, 1].sum() > 2 * table.ms[:, 0].sum()   # 18x the MACs of MB1K3 here
    assert math.isfinite(table.predict(["MB6K7"] * 17))


# --------------------------------------------------------------------------------------------
# A family of the user's own, registered by a --module file
# --------------------------------------------------------------------------------------------

USER_FAMILY = '''
import torch.nn as nn
import torch.nn.functional as F
from models import Family, register_arch
from models.blocks import NetworkBlock, check_genotype, group_slots


class TinyNet(nn.Module):
    """A stem, three residual blocks (two at 8 channels, one strided to 16), a classifier."""

    def __init__(self, convs, num_classes):
        super().__init__()
        self.genotype = check_genotype(convs, 3, "tinynet")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stage1 = NetworkBlock(8, 8, 1, self.genotype[:2])
        self.stage2 = NetworkBlock(8, 16, 2, self.genotype[2:])
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.stage2(self.stage1(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))


register_arch("tinynet", Family(
    build=lambda convs, classes, depth, width: TinyNet(convs, classes),
    slots=lambda depth, width, size: group_slots([8, 8, 16], [2, 1], [1, 2], size),
    image_size=32, num_classes=10, is_member=lambda m: isinstance(m, TinyNet),
    taps=("stage1", "stage2"), space=("Conv", "DConv", "ConvB2")))
'''


def test_a_user_family_from_module_is_searched_end_to_end(tiny_imagefolder, tmp_path):
    path = tmp_path / "tinynet.py"
    path.write_text(USER_FAMILY)
    argv = ["cifar10", f"--data_loc={tiny_imagefolder}", "--arch", "tinynet",
            "--module", str(path), "--param_goal", "3000", "--tol", "0.5", "--samples", "4",
            "--batch_size", "8", "--results_dir", str(tmp_path / "results"),
            "--genotype_dir", str(tmp_path / "genotypes"), "--save_file", "none"]
    try:
        summary = fisher_rank.main(fisher_rank.get_args_parser().parse_args(argv))
        df = pd.read_csv(summary["results"])
        assert len(df) == 4 and df["fisher"].notna().all()
        genotypes = [eval(c) for c in df["convs"]]
        assert all(len(g) == 3 and set(g) <= {"Conv", "DConv", "ConvB2"} for g in genotypes)
        model = Network("tinynet", None, None, 10).build(summary["best_genotype"])
        assert list(df["params"])[int(summary["best_index"])] == count_params(model)
        assert Network.of(model).arch == "tinynet"
    finally:
        ARCHS.pop("tinynet", None)


def test_an_unknown_arch_is_one_line(capsys, tmp_path):
    argv = ["cifar10", "--arch", "nosuchnet", "--generate_random", "--samples", "2",
            "--save_file", str(tmp_path / "a.csv")]
    with pytest.raises(SystemExit) as e:
        run_cli(fisher_rank.main, fisher_rank.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1
    assert "unknown architecture 'nosuchnet'" in err[0] and "mobilenet_v2" in err[0]


def test_residual_blocks_are_the_outermost_search_blocks():
    """An MBConv type inside a WRN block is part of that block, not a block of its own."""
    model = Network("wrn", 10, 1).build(["MB3K5", "Conv", "DConv"])
    assert residual_blocks(model) == [model.block1[0].layer[0], model.block2[0].layer[0],
                                      model.block3[0].layer[0]]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    assert fisher_scores(model, x, y).shape == (3,)
