"""BlockSwap's own computations: Fisher potential at initialisation, parameter budgets and the
exact sampling of genotypes within them (the design card's funcs.py).

The seed's public names stay importable from here: get_no_params, one_shot_fisher,
load_genotype and save_genotype (the genotype files live in files.py)."""
import argparse
import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockswap.cli import at_least, number
from blockswap.files import load_genotype, save_genotype  # noqa: F401 (the seed's API)
from models.blocks import UserError, count_params, logits_of, residual_blocks


def fraction(text: str) -> float:
    """argparse type of --tol: a fraction strictly between 0 and 1 (checked once, here)."""
    value = number(text)
    if not 0 < value < 1:   # NaN fails too
        raise argparse.ArgumentTypeError(f"{text}: must lie strictly between 0 and 1 (a "
                                         "fraction of the goal: 0.025 is +-2.5%)")
    return value


def budget_args() -> argparse.ArgumentParser:
    """--param_goal, --mac_goal and --tol as every script that samples takes them (a parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("budget")
    g.add_argument("--param_goal", default=Budget.param_goal, type=at_least(1),
                   help="parameter budget")
    g.add_argument("--mac_goal", default=Budget.mac_goal, type=at_least(1),
                   help="MAC budget (may join params)")
    g.add_argument("--tol", default=Budget.tol, type=fraction,
                   help="window half-width, a fraction between 0 and 1 (0.025: +-2.5%%)")
    return p


def get_no_params(net: nn.Module, verbose: bool = False) -> int:
    """Parameters as the original counts them (no BN running stats, no masks)."""
    total = count_params(net)
    if verbose:
        print(f"Net has {total} params in total")
    return total


# --------------------------------------------------------------------------------------------
# Fisher potential (Theis et al. 2018, as BlockSwap). For residual block b with branch output
# a (n, c, h, w) -- after the branch's last conv, before the shortcut is added -- and
# g = dL/da for the MEAN cross-entropy of one training minibatch:
#     Delta_c = 0.5 * mean_n (sum_hw a[n,c,h,w] * g[n,c,h,w])^2,   block value = sum_c Delta_c.
# Cost floor: one forward plus the gradients with respect to activations. Parameters are frozen
# for the call, so autograd records nothing before the first branch output and computes no
# weight gradient; torch.autograd.grad hands back dL/da without touching any `.grad`.
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def scoring_mode(net: nn.Module, freeze: bool = False):
    """How every score at initialisation sees a network (Fisher potential and the proxies):
    train mode with batch statistics, parameters frozen if `freeze`; all restored afterwards.

    BatchNorm in train mode with track_running_stats=False normalises by the batch (as a
    training step does) but leaves running_mean/var and num_batches_tracked untouched, so the
    network leaves exactly as it came. Dropout modules (MobileNetV2's classifier) are off: a
    score is a function of the network and the batch, not of a dropout draw."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()] if freeze else []
    bns = [m for m in net.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for m in bns:
        m.track_running_stats = False
    try:
        yield net
    finally:
        for m in bns:
            m.track_running_stats = True
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)


def fisher_scores(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fisher value of every residual block (genotype order), shape (n_blocks,), at the current
    weights; the network's weights, buffers, mode and requires_grad flags are left unchanged."""
    blocks = residual_blocks(net)
    if not blocks:
        raise UserError("fisher_scores: the network has no residual blocks to score")
    acts: List[torch.Tensor] = []

    def keep(module, inp, out):
        if not out.requires_grad:   # the first branch: nothing upstream needs a gradient
            out = out.detach().requires_grad_()
        acts.append(out)
        return out

    handles = [b.branch_end.register_forward_hook(keep) for b in blocks]
    try:
        with scoring_mode(net, freeze=True), torch.enable_grad():
            logits = logits_of(net(inputs))
            if len(acts) != len(blocks):
                raise UserError(f"fisher_scores: {len(blocks)} residual blocks but "
                                f"{len(acts)} branch outputs seen in one forward")
            grads = torch.autograd.grad(F.cross_entropy(logits, targets), acts)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        # (n, c, h, w) -> (n, c) -> (c,) -> scalar per block
        return torch.stack([0.5 * (a * g).sum((2, 3)).pow(2).mean(0).sum()
                            for a, g in zip(acts, grads)])


def _minibatches(data, n_steps: int):
    """n_steps (inputs, targets) pairs: one pair given is used every step; an iterable (a
    DataLoader) is restarted when it runs out, as the original did."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        for _ in range(n_steps):
            yield data[0], data[1]
        return
    it = iter(data)
    for _ in range(n_steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        yield batch[0], batch[1]


def one_shot_fisher(net: nn.Module, data, n_steps: int = 1):
    """(params, {block_index: Fisher value summed over n_steps minibatches}), as the original,
    but without the original's SGD step: the weights are never updated."""
    params = get_no_params(net)
    device = next(net.parameters()).device
    total = None
    for inputs, targets in _minibatches(data, n_steps):
        s = fisher_scores(net, inputs.to(device), targets.to(device))
        total = s if total is None else total + s
    return params, {i: float(v) for i, v in enumerate(total)}


# --------------------------------------------------------------------------------------------
# Sampling genotypes uniformly within a budget window. Rejection cannot reach most budgets
# (about 1 uniform WRN-40-2 genotype in 10^6 lands within +-2.5% of 1.6M params), so the
# sampler counts, for every position i and partial cost s of positions < i, how many ways the
# remaining positions complete a genotype inside the window (dynamic programming backwards
# over positions), then draws position by position with probability proportional to those
# counts: exactly uniform over the window.
#
# Counts: float64. They reach 24^18 ~ 7e24 > 2^63, and every count is a sum of non-negative
# terms (never a difference), so the relative error stays below ~1e-15 and a count is 0.0
# exactly when no completion exists: feasibility is exact, uniformity exact to 1e-15.
# Size: costs are shifted by each position's cheapest type and divided by the gcd of all
# shifts (WRN-40-2: 8 params, 2048 MACs), so each array is at most ~270K entries.
# With both a parameter and a MAC goal, the DP runs on the rarer window and draws are kept
# when they also meet the other: still exactly uniform over the intersection.
# --------------------------------------------------------------------------------------------

def budget_window(goal: float, tol: float = 0.025):
    """Integer costs accepted for `goal`: [ceil(goal(1-tol)), floor(goal(1+tol))]."""
    return math.ceil(goal * (1 - tol) - 1e-9), math.floor(goal * (1 + tol) + 1e-9)


class WindowCounts:
    """Completion counts for one cost (params or MACs) and one window [lo, hi].

    costs[i, t] is the cost of type t at position i; total = base + sum_i costs[i, t_i].
    `total` is the number of genotypes in the window (float64)."""

    def __init__(self, costs: np.ndarray, base: int, lo: int, hi: int):
        costs = np.asarray(costs, dtype=np.int64)
        self.min_total = int(base + costs.min(1).sum())
        self.max_total = int(base + costs.max(1).sum())
        shift = costs - costs.min(1, keepdims=True)
        g = int(np.gcd.reduce(shift.ravel())) or 1
        self.d = shift // g                                     # (P, T), >= 0, small ints
        P = len(self.d)
        L = -((self.min_total - lo) // g)                       # ceil((lo - min_total) / g)
        H = (hi - self.min_total) // g                          # floor(...)
        maxd = self.d.max(1)
        max_pre = np.concatenate([[0], np.cumsum(maxd)])        # largest partial sum before i
        max_suf = np.concatenate([np.cumsum(maxd[::-1])[::-1], [0]])
        # Partial sums s of positions < i that can still land in [L, H]: [off[i], top[i]].
        self.off = [max(0, L - int(max_suf[i])) for i in range(P + 1)]
        top = [min(int(max_pre[i]), H) for i in range(P + 1)]
        self.F = [None] * (P + 1)
        self.F[P] = np.ones(max(0, top[P] - self.off[P] + 1))
        for i in range(P - 1, -1, -1):
            self.F[i] = self._fold(i, max(0, top[i] - self.off[i] + 1))
        self.total = float(self.F[0][0]) if len(self.F[0]) and self.off[0] == 0 else 0.0

    def _fold(self, i: int, length: int) -> np.ndarray:
        """F_i[s] = sum over types t of F_{i+1}[s + d[i, t]]."""
        out, nxt, o = np.zeros(length), self.F[i + 1], self.off[i + 1]
        for dt in self.d[i]:
            start = self.off[i] + int(dt) - o       # index into nxt of out[0]
            a, b = max(0, -start), min(length, len(nxt) - start)
            if a < b:
                out[a:b] += nxt[start + a:start + b]
        return out

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """k independent uniform genotypes in the window, as an int array (k, P)."""
        P, T = self.d.shape
        s = np.zeros(k, np.int64)
        codes = np.empty((k, P), np.int64)
        for i in range(P):
            nxt = self.F[i + 1]
            j = s[:, None] + self.d[i][None, :] - self.off[i + 1]        # (k, T)
            ok = (j >= 0) & (j < len(nxt))
            w = np.where(ok, nxt[np.clip(j, 0, len(nxt) - 1)], 0.0)     # completions per t
            cum = w.cumsum(1)
            u = rng.random(k) * cum[:, -1]
            last = T - 1 - (w[:, ::-1] > 0).argmax(1)   # guards u rounding up to the total
            t = np.minimum((cum <= u[:, None]).sum(1), last)                # first cum > u
            codes[:, i] = t
            s += self.d[i][t]
        return codes


def _feasible_range_error(what: str, goal, tol, counts: WindowCounts) -> UserError:
    lo, hi = counts.min_total / (1 + tol), counts.max_total / (1 - tol)
    return UserError(f"no genotype has {what} within +-{tol:.1%} of {goal:,}: this network's "
                     f"genotypes range from {counts.min_total:,} to {counts.max_total:,} "
                     f"{what}, so the goal must lie between {math.ceil(lo):,} and "
                     f"{math.floor(hi):,}")


@dataclass(frozen=True)
class Budget:
    """The windows a genotype must meet: each given goal +-tol. `latency` is a
    latency.QuantisedLatency (integer costs and its own goal) for a latency goal. No goal: any
    genotype."""
    param_goal: Optional[int] = None
    mac_goal: Optional[int] = None
    tol: float = 0.025
    latency: object = None


def count_genotypes(table, budget: Budget = Budget()) -> float:
    """How many genotypes of `table` lie in the window of one goal (float64; exact below 2^53).
    With several goals this is the smallest of the single-window counts (an upper bound)."""
    counters = _window_counters(table, budget)
    if not counters:
        return float(len(table.names)) ** table.n_positions
    return min(c.total for c, _, _ in counters)


def _window_counters(table, budget: Budget):
    tol = budget.tol
    out = _latency_counter(budget.latency, tol)
    for what, goal, costs, base in (("params", budget.param_goal, table.params, table.base_params),
                                    ("MACs", budget.mac_goal, table.macs, table.base_macs)):
        if goal is None:
            continue
        lo, hi = budget_window(goal, tol)
        counts = WindowCounts(costs, base, lo, hi)
        if counts.total == 0:
            raise _feasible_range_error(what, goal, tol, counts)
        out.append((counts, costs, (base, lo, hi)))
    return out


def _latency_counter(latency, tol):
    """[] or the latency window's counter: its costs are already integers (quantised)."""
    if latency is None:
        return []
    lo, hi = latency.window(tol)
    counts = WindowCounts(latency.units, latency.base, lo, hi)
    if counts.total == 0:
        raise latency.infeasible(tol)
    return [(counts, latency.units, (latency.base, lo, hi))]


SAMPLE_CHUNK, MAX_DRAWS = 2048, 10_000_000   # draws per step; draws before giving up


def sample_codes(table, n: int, budget: Budget = Budget(), seed: int = 0,
                 distinct: bool = True, progress=None) -> np.ndarray:
    """(n, positions) type indices into table.names, uniform over the genotypes within the
    budget's windows (over all genotypes when it has no goal).

    Draws come in fixed-size chunks from one generator, so the first m of n samples are the
    samples of n=m: a larger --samples extends a search. `progress(k)` is told of k new ones."""
    rng = np.random.default_rng(seed)
    P, T = table.params.shape
    counters = sorted(_window_counters(table, budget), key=lambda c: c[0].total)
    chunk, max_draws = SAMPLE_CHUNK, MAX_DRAWS
    if distinct and len(counters) == 1 and counters[0][0].total < n:
        raise UserError(f"only {int(counters[0][0].total)} distinct genotypes meet this budget; "
                        f"ask for at most that many samples (--samples) or widen the window")
    kept, seen, draws = [], set(), 0
    while len(kept) < n:
        if draws >= max_draws:
            raise UserError(f"only {len(kept)} of {n} samples found meeting every goal "
                            f"(params, MACs, latency) after {draws:,} draws: the two windows barely "
                            "overlap; loosen one of the goals")
        codes = counters[0][0].draw(rng, chunk) if counters else rng.integers(0, T, (chunk, P))
        draws += chunk
        pos = np.arange(P)
        for _, costs, (base, lo, hi) in counters[1:]:
            total = base + costs[pos, codes].sum(1)
            codes = codes[(total >= lo) & (total <= hi)]
        before = len(kept)
        for row in codes:
            key = row.tobytes()
            if distinct and key in seen:
                continue
            seen.add(key)
            kept.append(row)
            if len(kept) == n:
                break
        if progress is not None and len(kept) > before:
            progress(len(kept) - before)
    return np.array(kept, np.int64).reshape(n, P)


def sample_genotypes(table, n: int, budget: Budget = Budget(), seed: int = 0,
                     distinct: bool = True, progress=None) -> List[List[str]]:
    """n genotypes (lists of block names), uniform within the budget window(s); see
    sample_codes. An infeasible budget raises UserError stating the feasible range."""
    codes = sample_codes(table, n, budget, seed, distinct, progress)
    return [[table.names[t] for t in row] for row in codes]


class QuantisedLatency:
    """A latency table in integer units of unit_ms, for funcs.WindowCounts.

    units[i, t] = round(ms[i, t] / unit_ms); base = round(fixed_ms / unit_ms); the goal's
    window is budget_window(goal_ms / unit_ms, tol) on the sum of units."""

    def __init__(self, table, goal_ms: float):   # table: latency.LatencyTable
        if not goal_ms > 0:
            raise UserError(f"--latency_goal must be a positive number of ms, got {goal_ms}")
        self.table, self.goal_ms = table, float(goal_ms)
        self.unit_ms = self.goal_ms / (100 * (table.n_positions + 1))
        self.units = np.rint(table.ms / self.unit_ms).astype(np.int64)
        self.base = int(round(table.fixed_ms / self.unit_ms))

    def window(self, tol: float):
        return budget_window(self.goal_ms / self.unit_ms, tol)

    def units_many(self, codes: np.ndarray) -> np.ndarray:
        return self.base + self.units[np.arange(len(self.units)), codes].sum(1)

    def in_window(self, codes: np.ndarray, tol: float) -> np.ndarray:
        lo, hi = self.window(tol)
        u = self.units_many(codes)
        return (u >= lo) & (u <= hi)

    def infeasible(self, tol: float) -> UserError:
        lo, hi = self.table.range_ms()
        return UserError(
            f"no genotype has a predicted latency within +-{tol:.1%} of {self.goal_ms:g} ms "
            f"on {self.table.key.describe()}: this network's genotypes take {lo:.3g} to "
            f"{hi:.3g} ms there, so the goal must lie between {lo / (1 + tol):.3g} and "
            f"{hi / (1 - tol):.3g} ms")
