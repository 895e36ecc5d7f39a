"""Zero-cost proxies: scores of an untrained network that should predict its trained accuracy.

Each proxy is one small function registered by name with `@proxy("name")`, in the style of
SamsungLabs/zero-cost-nas (`@measure('fisher')`), so the search loop looks a proxy up by name
and never branches on it:

    score = get_proxy("synflow")(net, inputs, targets)      # -> float, higher is better

`net` is a network at random initialisation in train mode whose forward returns
(logits, activations) or plain logits; `inputs` is one minibatch and `targets` its labels.
Every proxy leaves the network as it found it: same weights, same BatchNorm running
statistics, same train/eval mode, and no `.grad` on any parameter (gradients are taken with
torch.autograd.grad, never .backward()).

Fisher potential (BlockSwap's own proxy) stays the default of fisher_rank.py; the others let a
user compare proxies on the same candidates (see `spearman` for the rank correlation).
"""
import argparse
import copy
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from blockswap.ensembles import ProxySpec
from blockswap.funcs import fisher_scores, scoring_mode
from models.blocks import UserError, count_params, logits_of

Proxy = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]
PROXIES: Dict[str, Proxy] = {}


def proxy(name: str):
    """Decorator: register `fn(net, inputs, targets) -> float` under `name`."""
    def register(fn: Proxy) -> Proxy:
        if name in PROXIES:
            raise UserError(f"proxy {name!r} is already registered")
        PROXIES[name] = fn
        return fn
    return register


def get_proxy(name: str) -> Proxy:
    try:
        return PROXIES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown proxy {name!r}; valid names: " + ", ".join(PROXIES)) from None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# The layers whose weights the pruning-at-init proxies (snip, grad_norm, synflow) score, as
# zero-cost-nas's get_layer_metric_array (Conv2d/Linear; Conv1d/Conv3d for DConv3D and kin).
SCORED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def scored_weights(net: nn.Module) -> List[nn.Parameter]:
    """The weight of every conv and linear layer, in module order (shared ones once)."""
    seen, weights = set(), []
    for m in net.modules():
        if isinstance(m, SCORED_LAYERS) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            weights.append(m.weight)
    return weights


def loss_grads(net: nn.Module, inputs, targets, weights) -> List[torch.Tensor]:
    """dL/dw for the mean cross-entropy of one minibatch, without touching any `.grad`."""
    with scoring_mode(net):
        loss = F.cross_entropy(logits_of(net(inputs)), targets)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


# --------------------------------------------------------------------------------------------
# The proxies
# --------------------------------------------------------------------------------------------

@proxy("fisher")
def fisher(net, inputs, targets) -> float:
    """Fisher potential (Theis et al. 2018, as BlockSwap): the sum over residual blocks."""
    # fisher_scores restores the net itself (weights, BN buffers, mode, requires_grad)
    return float(fisher_scores(net, inputs, targets).sum())


@proxy("grad_norm")
def grad_norm(net, inputs, targets) -> float:
    """Sum over conv/linear weight tensors of ||dL/dW||_2 (zero-cost-nas's grad_norm)."""
    weights = scored_weights(net)
    return float(sum(g.norm() for g in loss_grads(net, inputs, targets, weights)))


@proxy("snip")
def snip(net, inputs, targets) -> float:
    """SNIP (Lee et al. 2019): sum of |w * dL/dw| over conv and linear weights."""
    weights = scored_weights(net)
    grads = loss_grads(net, inputs, targets, weights)
    return float(sum((w.detach() * g).abs().sum() for w, g in zip(weights, grads)))


@proxy("synflow")
def synflow(net, inputs, targets) -> float:
    """SynFlow (Tanaka et al. 2020): with every parameter replaced by its absolute value and an
    input of ones, R = sum of the logits; score = sum of w * dR/dw over conv/linear weights.

    BatchNorm follows zero-cost-nas: its 'synflow' is registered with
    `@measure('synflow', bn=False, mode='param')` and measures/__init__.py scores
    `net_orig.get_prunable_copy(bn=bn)` in train mode, i.e. a copy of the network with the
    BatchNorm layers removed. Here: a deep copy with every BatchNorm replaced by Identity, so
    the caller's network is never modified (no sign flipping and restoring needed). Float64,
    as zero-cost-nas (`net.double()`): without BN the all-positive signal grows by roughly the
    fan-in at every layer and overflows float32 in deep nets. MPS has no float64: float32 there.
    The weights and gradients are all >= 0, so sum(w * g) equals zero-cost-nas's sum |w * g|.
    """
    dtype = torch.float32 if inputs.device.type == "mps" else torch.float64
    twin = copy.deepcopy(net)
    for module in list(twin.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, BATCHNORMS):
                setattr(module, child_name, nn.Identity())
    twin.to(dtype).train()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    ones = torch.ones((1,) + tuple(inputs.shape[1:]), dtype=dtype, device=inputs.device)
    weights = scored_weights(twin)
    grads = torch.autograd.grad(logits_of(twin(ones)).sum(), weights, allow_unused=True)
    return float(sum((w.detach() * g).sum() for w, g in zip(weights, grads) if g is not None))


# torch.relu_ is also F.relu_; nn.ReLU calls F.relu.
_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


def is_relu(func, args, kwargs) -> bool:
    """A ReLU call, or a ReLU6 one (nn.ReLU6, MobileNetV2's, calls F.hardtanh(x, 0, 6)): the
    same on/off pattern, which is all NASWOT and SWAP read."""
    if func in _RELUS:
        return True
    if func is F.hardtanh or func is F.relu6:
        low = args[1] if len(args) > 1 else (kwargs or {}).get("min_val", -1.0)
        return func is F.relu6 or low == 0
    return False


class ReluKernel(TorchFunctionMode):
    """Accumulates NASWOT's kernel over every ReLU evaluated while the mode is active.

    Our blocks call F.relu functionally, so there are no nn.ReLU modules to hook, and hooking
    BatchNorm outputs would be wrong wherever a ReLU does not follow a BN directly (a post-
    activation ResNet's relu(bn(x) + shortcut), a user's --module block). A torch-function mode
    sees every call of F.relu, torch.relu, Tensor.relu and their in-place forms, whatever module
    makes it. Inside __torch_function__ the mode is disabled, so the bookkeeping below is not
    itself intercepted.
    """

    def __init__(self, n: int, device):
        super().__init__()
        self.kernel = torch.zeros(n, n, dtype=torch.float64, device=device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_relu(func, args, kwargs):
            self.add(out)
        return out

    def add(self, out: torch.Tensor):
        """K += N_A - Hamming(c_i, c_j) for this ReLU's binary codes c (one row per input).
        With s = 2c - 1 in {-1, +1}: s_i . s_j = N_A - 2 H_ij, so N_A - H = (s s^T + N_A) / 2."""
        s = (out.detach().flatten(1) > 0).to(torch.float32) * 2 - 1     # (n, N_A)
        if s.shape[1] >= 2 ** 24:   # float32 sums of +-1 are exact only below 2^24 terms
            s = s.double()
        self.kernel += ((s @ s.T).double() + s.shape[1]) / 2


@proxy("naswot")
def naswot(net, inputs, targets) -> float:
    """NASWOT (Mellor et al. 2021): log|det K| of the kernel K_ij = sum over ReLUs of
    N_A - Hamming distance between the binary activation codes of inputs i and j."""
    with scoring_mode(net), torch.no_grad(), ReluKernel(len(inputs), inputs.device) as mode:
        net(inputs)
    return float(torch.linalg.slogdet(mode.kernel).logabsdet)


@proxy("params")
def params(net, inputs, targets) -> float:
    """The parameter count (models.blocks.count_params): the baseline every proxy should beat."""
    return float(count_params(net))


@proxy("jacob_cov")
def jacob_cov(net, inputs, targets) -> float:
    """Jacobian covariance (Mellor et al. 2020 v1, as zero-cost-nas's jacob_cov): J_i = d(sum of
    the logits of input i)/d(input i), one row per input; C = corrcoef of those rows (n x n);
    score = -sum_k log(l_k + 1e-5) + 1 / (l_k + 1e-5) over the eigenvalues l of C.

    Departures from zero-cost-nas: the eigenvalues come from eigvalsh (C is symmetric; their
    np.linalg.eig may return complex values from rounding) in float64; a degenerate C (an input
    whose gradient is constant, where they print the exception and return NaN) scores -inf, so
    it ranks last instead of poisoning a sort. BatchNorm stays in, train mode (bn=True there).
    The score is already a log-determinant-like quantity: no further log.
    """
    with scoring_mode(net):
        x = inputs.detach().clone().requires_grad_(True)
        (jac,) = torch.autograd.grad(logits_of(net(x)).sum(), x)
    return jacob_cov_score(jac.flatten(1))


def jacob_cov_score(jac: torch.Tensor, k: float = 1e-5) -> float:
    """The score of an (n, d) Jacobian, one row per input."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(jac.detach().double().cpu().numpy())
    if not np.all(np.isfinite(corr)):
        return float("-inf")
    eig = np.linalg.eigvalsh(corr)
    return float(-np.sum(np.log(eig + k) + 1.0 / (eig + k)))


@proxy("grasp")
def grasp(net, inputs, targets) -> float:
    """GraSP (Wang et al. 2020, as zero-cost-nas's grasp): -sum over conv/linear weights of
    w * (H g), with g = dL/dw and H the Hessian of the loss, by double backward.

    zero-cost-nas takes g from one forward and Hg from a second forward of the same batch; in
    train mode without dropout both forwards are identical, so one forward serves both here (half
    the cost, the same value). Temperature T = 1 and one iteration, their defaults. The score is
    a signed sum of moderate magnitude: reported as is (no log).
    """
    weights = scored_weights(net)
    with scoring_mode(net):
        loss = F.cross_entropy(logits_of(net(inputs)), targets)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        used = [(w, g) for w, g in zip(weights, grads) if g is not None]
        z = sum((g.detach() * g).sum() for _, g in used)           # g . g with g held fixed
        hg = torch.autograd.grad(z, [w for w, _ in used], allow_unused=True)   # H g
    return float(-sum((w.detach() * h).sum() for (w, _), h in zip(used, hg) if h is not None))


@proxy("zico")
def zico(net, inputs, targets, splits: int = 2) -> float:
    """ZiCo (Li et al., ICLR 2023): the minibatch is cut into `splits` parts (the authors'
    split_data=2) and dL/dw taken on each; per conv/linear layer, s = sum over weights of
    mean|g| / std(g) across the parts (weights with std 0 left out); score = sum of log s.

    Departure: the authors' zero-cost-nas version (and the copy in MeCo's repository) never zero
    the gradients between parts, so their second 'sample' is the sum of both; here every part's
    gradient is its own (the paper's definition: mean and std of per-batch gradients). Float64
    statistics; std with 1/n as np.std. Already in log space (the authors' convention).
    """
    weights = scored_weights(net)
    per_part = [loss_grads(net, x, y, weights)
                for x, y in zip(inputs.chunk(splits), targets.chunk(splits))]
    score = 0.0
    for layer in zip(*per_part):
        g = torch.stack([t.flatten() for t in layer]).double()        # (parts, weights)
        std = g.std(0, unbiased=False)
        keep = std > 0
        s = float((g.abs().mean(0)[keep] / std[keep]).sum())
        if s > 0:
            score += float(np.log(s))
    return score


@proxy("meco")
def meco(net, inputs, targets) -> float:
    """MeCo (Jiang et al., NeurIPS 2023): one input; for every module whose output is a
    feature map (C, H, W), the smallest eigenvalue of the C x C Pearson correlation between its
    channels (each channel's H*W values one variable); score = the sum over modules.

    As the authors: a forward hook on every module (containers included, so a block's output
    and its last layer's output both count), NaN/inf correlations set to 0 (constant channels),
    train mode. Departures: the input is the first image of the minibatch, not the Gaussian
    noise image their code draws (their title says 'one data'; a real image is deterministic
    and comes from the user's data like the other proxies' inputs); modules whose output is not
    a 4-D tensor (the classifier, our (logits, activations) tuple) are skipped where their code
    adds a 0 for them; eigvalsh in float64 instead of eig. Our blocks call F.relu functionally,
    so no separate ReLU output is hooked (NAS-Bench-201's nn.ReLU modules are). No log: the
    eigenvalues lie in [0, 1].
    """
    found = []

    def hook(module, inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            found.append(min_channel_correlation_eig(out[0]))
    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with scoring_mode(net), torch.no_grad():
            net(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return float(sum(found))


def min_channel_correlation_eig(fmap: torch.Tensor) -> float:
    """Smallest eigenvalue of the channel correlation matrix of one (C, H, W) feature map."""
    fea = fmap.detach().double().flatten(1)                            # (C, H*W)
    corr = torch.corrcoef(fea) if len(fea) > 1 else torch.ones(1, 1, dtype=fea.dtype)
    corr = torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    return float(torch.linalg.eigvalsh(corr.cpu())[0])


class ReluCodes(TorchFunctionMode):
    """Collects, for every ReLU on a feature map (4-D input) evaluated while active, each
    neuron's binary pattern over the batch, packed 63 samples to an int64 word (SWAP).
    (Same interception as ReluKernel: our blocks call F.relu functionally.)"""

    def __init__(self):
        super().__init__()
        self.codes = []          # one (neurons, words) int64 tensor per ReLU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_relu(func, args, kwargs) and out.dim() == 4:
            self.codes.append(pack_columns(out.detach().flatten(1) > 0))
        return out


def pack_columns(bits: torch.Tensor) -> torch.Tensor:
    """(n, m) bool -> (m, ceil(n / 63)) int64: column j's n bits as base-2 words."""
    n, m = bits.shape
    words = -(-n // 63)
    padded = torch.zeros(words * 63, m, dtype=torch.int64, device=bits.device)
    padded[:n] = bits.to(torch.int64)
    powers = 2 ** torch.arange(63, dtype=torch.int64, device=bits.device)
    return (padded.view(words, 63, m) * powers[None, :, None]).sum(1).T    # (m, words)


@proxy("swap")
def swap(net, inputs, targets) -> float:
    """SWAP (Peng et al., ICLR 2024): the number of distinct sample-wise activation patterns:
    every post-ReLU neuron of every feature-map ReLU gets the binary vector of where it is
    active over the n inputs; score = how many distinct vectors there are (<= 2^n).

    As the authors: ReLUs with 4-D inputs only, sign of the output (> 0), train mode. Departure:
    no parameter regularisation (their 'regular' factor exp(-(params - mu)^2 / sigma) rewards a
    size near mu; a within-budget search fixes params to +-2.5%, and with mu and sigma taken from
    one network, as their compute_swap does, sigma is undefined). A count: no log.
    """
    with scoring_mode(net), torch.no_grad(), ReluCodes() as mode:
        net(inputs)
    if not mode.codes:
        return 0.0
    codes = torch.cat(mode.codes)                                      # (neurons, words)
    unique = torch.unique(codes[:, 0]) if codes.shape[1] == 1 else torch.unique(codes, dim=0)
    return float(len(unique))


def proxy_spec(text: str) -> ProxySpec:
    """A --proxy list parsed once, its names checked against the registered proxies."""
    return ProxySpec(text, PROXIES)


def proxy_arg(text: str) -> str:
    """argparse type of --proxy: names and ensembles checked at parse time (proxy_spec)."""
    try:
        proxy_spec(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
