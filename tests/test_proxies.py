"""Zero-cost proxies against independent computations on tiny nets; registry; spearman."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockswap import funcs
from blockswap import proxies
from blockswap import ensembles
from blockswap import stats
from models import UserError, WideResNet


class TwoLayer(nn.Module):
    """x -> W1 x (+b1) -> [BN] -> relu -> W2 . (+b2); returns (logits, []) as our nets do."""

    def __init__(self, d=5, h=7, c=3, bias=False, bn=False):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.bn = nn.BatchNorm1d(h) if bn else nn.Identity()
        self.fc2 = nn.Linear(h, c, bias=bias)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x)))), []


def _batch(n=6, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _wrn(convs=("DConv", "ConvB2", "Conv"), seed=0):
    torch.manual_seed(seed)
    return WideResNet(10, 1, convs=list(convs))


def _images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hand_grads(net: TwoLayer, x, y):
    """dL/dW1, dL/dW2 of the mean cross-entropy, by the chain rule in float64 numpy."""
    W1, W2 = (net.fc1.weight.detach().double().numpy(), net.fc2.weight.detach().double().numpy())
    x = x.double().numpy()
    h = x @ W1.T
    a = np.maximum(h, 0)
    z = a @ W2.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(z.shape[1])[y.numpy()]) / len(x)   # d mean-CE / d logits
    dW2 = dz.T @ a
    dW1 = ((dz @ W2) * (h > 0)).T @ x
    return (W1, dW1), (W2, dW2)


# --- registry --------------------------------------------------------------------------------

def test_registry_names_and_unknown_name():
    assert list(proxies.PROXIES) == ["fisher", "grad_norm", "snip", "synflow", "naswot", "params",
                                     "jacob_cov", "grasp", "zico", "meco", "swap"]
    assert proxies.get_proxy("snip") is proxies.snip
    with pytest.raises(UserError, match="unknown proxy 'snp'.*fisher, grad_norm, snip"):
        proxies.get_proxy("snp")
    with pytest.raises(UserError, match="already registered"):
        proxies.proxy("snip")(lambda net, x, y: 0.0)


# --- each proxy against an independent computation ------------------------------------------

def test_grad_norm_and_snip_by_hand_on_two_layer_net():
    torch.manual_seed(0)
    net = TwoLayer()
    x, y = _batch()
    (W1, dW1), (W2, dW2) = _hand_grads(net, x, y)
    assert proxies.grad_norm(net, x, y) == pytest.approx(
        np.linalg.norm(dW1) + np.linalg.norm(dW2), rel=1e-5)
    assert proxies.snip(net, x, y) == pytest.approx(
        np.abs(W1 * dW1).sum() + np.abs(W2 * dW2).sum(), rel=1e-5)


def test_grad_norm_and_snip_match_backward_on_a_clone_of_a_wrn():
    net = _wrn()
    x, y = _images()
    clone = copy.deepcopy(net).train()
    F.cross_entropy(clone(x)[0], y).backward()
    layers = [m for m in clone.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    assert len(layers) == len(proxies.scored_weights(net)) > 10
    expect_norm = sum(m.weight.grad.norm().item() for m in layers)
    expect_snip = sum((m.weight * m.weight.grad).abs().sum().item() for m in layers)
    assert proxies.grad_norm(net, x, y) == pytest.approx(expect_norm, rel=1e-4)
    assert proxies.snip(net, x, y) == pytest.approx(expect_snip, rel=1e-4)


def test_synflow_closed_form_two_layer_net_without_bias():
    """R = 1'|W2||W1|1 is linear in each layer's weights, so sum_l w_l . dR/dw_l = 2R.
    The BatchNorm in between is removed (zero-cost-nas's bn=False convention)."""
    torch.manual_seed(0)
    net = TwoLayer(bn=True)
    W1, W2 = net.fc1.weight.detach().double().abs(), net.fc2.weight.detach().double().abs()
    R = (W2 @ W1 @ torch.ones(5, dtype=torch.float64)).sum().item()
    x, y = _batch()
    assert proxies.synflow(net, x, y) == pytest.approx(2 * R, rel=1e-12)


def test_synflow_closed_form_with_biases():
    """a = |W1|1 + |b1|, R = 1'(|W2|a + |b2|): score = 1'|W2|a + 1'|W2||W1|1 (biases unscored)."""
    torch.manual_seed(1)
    net = TwoLayer(bias=True)
    W1, W2 = net.fc1.weight.detach().double().abs(), net.fc2.weight.detach().double().abs()
    b1 = net.fc1.bias.detach().double().abs()
    ones = torch.ones(5, dtype=torch.float64)
    a = W1 @ ones + b1
    expect = (W2 @ a).sum() + (W2 @ W1 @ ones).sum()
    x, y = _batch()
    assert proxies.synflow(net, x, y) == pytest.approx(expect.item(), rel=1e-12)


def test_synflow_on_a_wrn_is_batch_independent_and_finite():
    net = _wrn()
    x, y = _images()
    s = proxies.synflow(net, x, y)
    assert np.isfinite(s) and s > 0
    assert proxies.synflow(net, x[:1] * 7, y[:1]) == s   # only the input's shape matters


class ManyRelus(nn.Module):
    """Three ReLUs written three ways (F.relu, Tensor.relu, nn.ReLU): naswot must see all."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 16), nn.Linear(16, 12), nn.Linear(12, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        h1 = F.relu(self.fc1(x))
        h2 = self.fc2(h1).relu()
        return self.act(self.fc3(h2)), []


def test_naswot_against_kernel_from_explicit_codes():
    torch.manual_seed(0)
    net = ManyRelus()
    x, y = _batch(n=6)
    with torch.no_grad():
        h1 = F.relu(net.fc1(x))
        h2 = F.relu(net.fc2(h1))
        h3 = F.relu(net.fc3(h2))
    K = np.zeros((6, 6))
    for h in (h1, h2, h3):
        c = (h > 0).double().numpy()
        hamming = (c[:, None, :] != c[None, :, :]).sum(-1)
        K += c.shape[1] - hamming
    sign, logdet = np.linalg.slogdet(K)
    assert sign > 0
    assert proxies.naswot(net, x, y) == pytest.approx(logdet, rel=1e-10)


def test_naswot_on_a_wrn_equals_codes_taken_after_each_batchnorm():
    """In a pre-activation WRN every ReLU directly follows a BatchNorm: hooking the BN outputs
    is an independent way to get the same codes."""
    net = _wrn()
    x, y = _images(n=6)
    clone = copy.deepcopy(net).train()
    codes = []
    for m in clone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: codes.append(out.flatten(1) > 0))
    with torch.no_grad():
        clone(x)
    # DConv block: bn1, bn2 + one BN in each of its 2 separable convs; ConvB2: bn1 + the
    # bottleneck's 2; Conv: bn1, bn2; the final BN.
    assert len(codes) == 4 + 3 + 2 + 1
    K = torch.zeros(6, 6, dtype=torch.float64)
    for c in codes:
        c = c.double()
        K += c @ c.T + (1 - c) @ (1 - c).T
    assert proxies.naswot(net, x, y) == pytest.approx(torch.linalg.slogdet(K)[1].item(), rel=1e-10)


def test_params_exact():
    net = TwoLayer(d=3, h=4, c=2, bias=True, bn=True)
    assert proxies.params(net, None, None) == 3 * 4 + 4 + 4 + 4 + 4 * 2 + 2
    wrn = _wrn()
    assert proxies.params(wrn, None, None) == sum(p.numel() for p in wrn.parameters())


def test_fisher_proxy_is_the_sum_of_fisher_scores():
    net = _wrn()
    x, y = _images()
    expect = float(funcs.fisher_scores(copy.deepcopy(net).train(), x, y).sum())
    assert proxies.fisher(net, x, y) == pytest.approx(expect, rel=1e-6)


def test_jacob_cov_from_hand_jacobian_of_two_layer_net():
    """d(sum of logits)/dx_i = W1' (relu'(h_i) * W2'1): rows -> corrcoef -> eig (as the authors)."""
    torch.manual_seed(0)
    net = TwoLayer(d=5, h=7)
    x, y = _batch(n=4)
    W1, W2 = net.fc1.weight.detach().double().numpy(), net.fc2.weight.detach().double().numpy()
    h = x.double().numpy() @ W1.T
    J = ((h > 0) * W2.sum(0)) @ W1                                   # (n, d)
    v = np.real(np.linalg.eig(np.corrcoef(J))[0])
    expect = -np.sum(np.log(v + 1e-5) + 1 / (v + 1e-5))
    assert proxies.jacob_cov(net, x, y) == pytest.approx(expect, rel=1e-6)


def test_jacob_cov_on_a_wrn_matches_backward_on_the_input():
    net = _wrn()
    x, y = _images()
    clone, xg = copy.deepcopy(net).train(), x.clone().requires_grad_(True)
    clone(xg)[0].backward(torch.ones(len(x), 10))
    assert proxies.jacob_cov(net, x, y) == pytest.approx(
        proxies.jacob_cov_score(xg.grad.flatten(1)), rel=1e-9)
    assert proxies.jacob_cov_score(torch.ones(3, 4)) == float("-inf")   # degenerate: last


def test_grasp_against_an_explicit_hessian():
    """-w . (H g) with H the full Hessian of the loss in (W1, W2), BatchNorm in train mode."""
    torch.manual_seed(0)
    net = TwoLayer(d=4, h=5, c=3, bn=True)
    x, y = _batch(n=6, d=4)
    names = ["fc1.weight", "fc2.weight"]
    shapes = [net.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]
    w0 = torch.cat([net.get_parameter(n).detach().flatten() for n in names]).double()
    others = {k: v.detach().double() for k, v in net.named_parameters() if k not in names}
    buffers = {k: v.clone().double() for k, v in net.named_buffers()}
    twin = copy.deepcopy(net).double()

    def loss(w):
        parts = dict(zip(names, (p.view(s) for p, s in zip(w.split(sizes), shapes))))
        out = torch.func.functional_call(twin, {**others, **parts, **{
            k: v.clone() for k, v in buffers.items()}}, (x.double(),))[0]
        return F.cross_entropy(out, y)
    g = torch.autograd.functional.jacobian(loss, w0)
    H = torch.autograd.functional.hessian(loss, w0)
    expect = -(w0 @ (H @ g)).item()
    assert abs(expect) > 1e-6
    assert proxies.grasp(net, x, y) == pytest.approx(expect, rel=1e-4)


def test_zico_from_hand_gradients_of_each_half():
    torch.manual_seed(0)
    net = TwoLayer()
    x, y = _batch(n=8)
    halves = [_hand_grads(net, x[:4], y[:4]), _hand_grads(net, x[4:], y[4:])]
    expect = 0.0
    for layer in range(2):
        g = np.stack([halves[0][layer][1].ravel(), halves[1][layer][1].ravel()])
        std, mean_abs = g.std(0), np.abs(g).mean(0)
        nz = std > 0
        expect += np.log((mean_abs[nz] / std[nz]).sum())
    assert proxies.zico(net, x, y) == pytest.approx(expect, rel=1e-6)


class SmallConv(nn.Module):
    """conv -> BN -> relu -> conv, pooled to logits: three 4-D module outputs for MeCo."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = self.bn(self.conv1(x))
        b = self.conv2(F.relu(a))
        return self.fc(b.mean((2, 3))), []


def test_meco_against_numpy_on_explicit_feature_maps():
    torch.manual_seed(0)
    net = SmallConv()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        c1 = net.conv1(x[:1])
        a = F.batch_norm(c1, None, None, net.bn.weight, net.bn.bias, training=True)
        c2 = net.conv2(F.relu(a))
    expect = 0.0
    for fmap in (c1, a, c2):
        corr = np.nan_to_num(np.corrcoef(fmap[0].flatten(1).double().numpy()))
        expect += np.real(np.linalg.eig(corr)[0]).min()
    assert proxies.meco(net, x, None) == pytest.approx(expect, rel=1e-8)
    assert proxies.meco(net, x[:1], None) == proxies.meco(net, x, None)   # first image only


class ConvRelus(nn.Module):
    """Feature-map ReLUs written three ways, then a ReLU on a vector (which SWAP ignores)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.act, self.fc = nn.ReLU(), nn.Linear(2, 4)

    def forward(self, x):
        h1 = F.relu(self.c1(x))
        h2 = self.act(self.c2(h1)).relu()
        return F.relu(self.fc(h2.mean((2, 3)))), [h1, h2]


@pytest.mark.parametrize("n", [5, 70])   # 70: patterns span two 63-bit words
def test_swap_counts_distinct_patterns_as_a_python_set(n):
    torch.manual_seed(0)
    net = ConvRelus()
    x = torch.randn(n, 2, 3, 3)
    with torch.no_grad():
        h1 = F.relu(net.c1(x))
        h2 = F.relu(net.c2(h1))
    codes = torch.cat([h1.flatten(1), h2.flatten(1), h2.flatten(1)], 1) > 0   # (n, neurons)
    patterns = {tuple(col.tolist()) for col in codes.T}
    assert 2 < len(patterns) < codes.shape[1]
    assert proxies.swap(net, x, None) == len(patterns)


def test_pack_columns_round_trip():
    bits = torch.rand(130, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = proxies.pack_columns(bits)
    assert packed.shape == (9, 3)
    unpacked = [[(int(packed[j, i // 63]) >> (i % 63)) & 1 for i in range(130)] for j in range(9)]
    assert torch.equal(torch.tensor(unpacked).T.bool(), bits)


# --- every proxy leaves the net as it found it, and is deterministic --------------------------

@pytest.mark.parametrize("name", list(proxies.PROXIES))
def test_proxy_leaves_net_unchanged_and_is_deterministic(name):
    net = _wrn().train()
    x, y = _images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = proxies.get_proxy(name)(net, x, y)
    assert isinstance(first, float) and np.isfinite(first)
    for k, v in net.state_dict().items():   # weights and BN running statistics
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert net.training
    assert proxies.get_proxy(name)(net, x, y) == first
    net.eval()
    proxies.get_proxy(name)(net, x, y)
    assert not net.training                  # the caller's mode is restored


# --- spearman --------------------------------------------------------------------------------

def test_spearman_hand_example_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5)
    assert stats.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert stats.rankdata([10, 30, 20, 20]).tolist() == [1, 4, 2.5, 2.5]
    assert stats.spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        stats.spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 8, size=30).astype(float)    # many ties
        y = x + rng.normal(size=30)
        assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)


def test_kendall_matches_scipy_and_a_hand_example():
    # pairs of [1,2,3] vs [1,3,2]: (1,2)+ (1,3)+ (2,3)- -> tau = 1/3
    assert stats.kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert np.isnan(stats.kendall([1, 1], [1, 2]))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=25).astype(float)
    y = x + rng.normal(size=25)
    assert stats.kendall(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0], abs=1e-12)


# --- ensembles -------------------------------------------------------------------------------

def test_vote_is_a_pairwise_majority_count():
    a = [3, 1, 2, 0]
    b = [3, 2, 1, 0]
    c = [0, 1, 2, 3]
    # candidate 0 beats 1, 2, 3 on a and b (2 of 3): 3 wins; 1 beats 3 (a, b); 2 beats 3; 3 none
    # 1 vs 2: a says 2, b says 1, c says 2 -> 2 wins
    assert ensembles.vote_scores([a, b, c]).tolist() == [3, 1, 2, 0]
    assert ensembles.vote_scores([[float("nan"), 1], [0, 1], [0, 1]]).tolist() == [0, 1]


def test_mean_rank_and_spec_parsing():
    assert ensembles.mean_rank_scores([[10, 30, 20], [1, 2, 3]]).tolist() == [1, 2.5, 2.5]
    spec = ensembles.ProxySpec("fisher, vote,rank:synflow+meco")
    assert spec.columns == ["fisher", "synflow", "jacob_cov", "snip", "meco"]
    assert spec.ranker == "fisher" and spec.label == "fisher_vote_rank-synflow+meco"
    assert ensembles.ProxySpec("synflow").label == "synflow"
    table = {"synflow": [1, 2, 3], "meco": [3, 2, 1]}
    assert spec.scores("rank:synflow+meco", table).tolist() == [2, 2, 2]
    with pytest.raises(UserError, match="unknown proxy 'fishr'"):
        proxies.proxy_spec("fishr,synflow")              # names checked against PROXIES
    with pytest.raises(UserError, match="unknown proxy 'fishr'"):
        proxies.proxy_spec("fisher,rank:synflow+fishr")  # also inside an ensemble
    assert proxies.proxy_spec("fisher, vote,rank:synflow+meco").columns == spec.columns
    with pytest.raises(UserError, match="fisher named twice"):
        ensembles.ProxySpec("fisher,synflow,fisher")
    with pytest.raises(UserError, match="names a proxy twice"):
        ensembles.ProxySpec("fisher,rank:synflow+synflow")
    with pytest.raises(UserError, match="two proxies or more"):
        ensembles.ProxySpec("rank:synflow")
