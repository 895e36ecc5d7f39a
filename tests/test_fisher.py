"""Fisher potential (funcs.fisher_scores / one_shot_fisher) against an independent computation:
every parameter trainable, retain_grad on each residual branch output, loss.backward()."""
import copy

import pytest
import torch
import torch.nn.functional as F

from blockswap.count_ops import count_params
from blockswap.funcs import fisher_scores, one_shot_fisher
from models import ResNet, WideResNet, residual_blocks

MIXED = ["Conv", "G4B2", "DConvA2"]


NETS = {
    "wrn-10-1": lambda: WideResNet(10, 1, MIXED, 10),
    "wrn-16-1": lambda: WideResNet(16, 1, ["DConv", "ConvB2", "Conv", "A4B2", "DConvG2", "G8B4"]),
    "resnet-1111": lambda: ResNet((1, 1, 1, 1), ["Conv", "ConvB4", "DConvA4", "Conv"], 10),
}


def make(name):
    torch.manual_seed(0)
    return NETS[name]()


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def reference_fisher(net, x, y):
    """Straightforward: a copy in train mode, weights trainable, branch outputs kept with
    retain_grad, a full backward; the formula in float64 with einsum."""
    net = copy.deepcopy(net).train()
    kept = []

    def hook(module, inp, out):
        out.retain_grad()
        kept.append(out)
    for b in residual_blocks(net):
        b.branch_end.register_forward_hook(hook)
    logits, _ = net(x)
    F.cross_entropy(logits, y).backward()
    values = []
    for a in kept:
        a64, g64 = a.detach().double(), a.grad.double()
        per_nc = torch.einsum("nchw,nchw->nc", a64, g64)          # sum over h, w
        values.append(0.5 * (per_nc ** 2).mean(0).sum())        # mean over n, sum over c
    return torch.stack(values)


@pytest.mark.parametrize("name", ["wrn-10-1", "wrn-16-1", "resnet-1111"])
def test_fisher_matches_independent_autograd(name):
    net = make(name)
    x, y = batch()
    ours = fisher_scores(net, x, y)
    ref = reference_fisher(net, x, y)
    assert ours.shape == (len(residual_blocks(net)),)
    assert torch.all(ref > 0)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=0)


def test_fisher_leaves_net_untouched():
    net = make("wrn-10-1")
    net.eval()
    net.fc.bias.requires_grad_(False)           # a frozen parameter must stay frozen
    state = copy.deepcopy(net.state_dict())     # weights and BN running statistics
    flags = [p.requires_grad for p in net.parameters()]
    fisher_scores(net, *batch())
    assert not net.training
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fisher_uses_training_mode_batchnorm():
    """An eval-mode net is scored with batch statistics, as a training step would be."""
    net = make("wrn-10-1")
    x, y = batch()
    train_score = fisher_scores(net.train(), x, y)
    eval_score = fisher_scores(net.eval(), x, y)
    torch.testing.assert_close(train_score, eval_score, rtol=0, atol=0)


def test_one_shot_fisher_sums_minibatches():
    net = make("wrn-10-1")
    b1, b2 = batch(seed=1), batch(seed=2)
    params, fish = one_shot_fisher(net, [b1, b2], n_steps=2)
    assert params == count_params(net)
    expected = fisher_scores(net, *b1) + fisher_scores(net, *b2)
    assert list(fish) == [0, 1, 2]
    assert [fish[i] for i in range(3)] == pytest.approx(expected.tolist(), rel=1e-6)
    # one (x, y) tuple; a loader that runs out restarts (as the original's iterator)
    assert one_shot_fisher(net, b1)[1] == pytest.approx(dict(enumerate(
        fisher_scores(net, *b1).tolist())), rel=1e-6)
    _, twice = one_shot_fisher(net, [b1], n_steps=2)
    assert twice[0] == pytest.approx(2 * fish_of(net, b1)[0], rel=1e-6)


def fish_of(net, b):
    return fisher_scores(net, *b).tolist()
