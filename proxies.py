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
import contextlib
import copy
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from count_ops import count_params
from funcs import fisher_scores
from models.blocks import UserError

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


def logits_of(output) -> torch.Tensor:
    """Our networks return (logits, activations); plain modules return logits."""
    return output[0] if isinstance(output, (tuple, list)) else output


def scored_weights(net: nn.Module) -> List[nn.Parameter]:
    """The weight of every conv and linear layer, in module order (shared ones once)."""
    seen, weights = set(), []
    for m in net.modules():
        if isinstance(m, SCORED_LAYERS) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            weights.append(m.weight)
    return weights


@contextlib.contextmanager
def preserved(net: nn.Module):
    """Run in train mode; afterwards restore the mode and every buffer (a training-mode forward
    updates BatchNorm running statistics and num_batches_tracked)."""
    was_training = net.training
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    net.train()
    try:
        yield net
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        net.train(was_training)


def loss_grads(net: nn.Module, inputs, targets, weights) -> List[torch.Tensor]:
    """dL/dw for the mean cross-entropy of one minibatch, without touching any `.grad`."""
    with preserved(net):
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
        if func in _RELUS:
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
    with preserved(net), torch.no_grad(), ReluKernel(len(inputs), inputs.device) as mode:
        net(inputs)
    return float(torch.linalg.slogdet(mode.kernel).logabsdet)


@proxy("params")
def params(net, inputs, targets) -> float:
    """The parameter count (count_ops.count_params): the baseline every proxy should beat."""
    return float(count_params(net))


# --------------------------------------------------------------------------------------------
# Rank correlation, for the proxy study
# --------------------------------------------------------------------------------------------

def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks. NaN when either side is
    constant or there are fewer than two points (as scipy.stats.spearmanr)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")
