"""Student losses: attention transfer (Zagoruyko & Komodakis 2017), Hinton KD, DKD (Zhao et al.
2022) and DIST (Huang et al. 2022), as terms added to the cross-entropy (--distill at+kd, ...)."""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from blockswap.cli import at_least, positive
from models.archs import Network
from models.blocks import UserError, logits_of


def at(x: torch.Tensor) -> torch.Tensor:
    """Attention map: (n, c, h, w) -> (n, h*w), the channel mean of x^2, L2-normalised."""
    return F.normalize(x.pow(2).mean(1).flatten(1))


def at_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (at(x) - at(y)).pow(2).mean()


def dkd_loss(student_logits, teacher_logits, targets, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) without its cross-entropy and warm-up:
    alpha * TCKD + beta * NCKD, each a KL(teacher || student) at temperature T, times T^2,
    averaged over the batch. TCKD compares the binary (target, all other classes) split of the
    softened probabilities; NCKD the distribution over the non-target classes only."""
    T = temperature
    n, c = student_logits.shape
    is_target = F.one_hot(targets, c).bool()
    # binary split in log space (stable where the rest has almost no mass): (n, 2)
    def split(z):
        log_p = F.log_softmax(z / T, dim=1)
        return torch.stack([log_p[is_target], log_p.masked_fill(is_target, -math.inf)
                            .logsumexp(1)], 1)
    tckd = F.kl_div(split(student_logits), split(teacher_logits), reduction="batchmean",
                    log_target=True)
    # the non-target classes, target column removed: (n, c - 1)
    others_s, others_t = (z[~is_target].view(n, c - 1) / T
                          for z in (student_logits, teacher_logits))
    nckd = F.kl_div(F.log_softmax(others_s, 1), F.log_softmax(others_t, 1),
                    reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (T * T)


def _row_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: (n, k) -> (n,)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits, teacher_logits, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): with p = softmax(z / T) per sample, inter = 1 - mean
    Pearson correlation of student and teacher rows (each sample's class scores), intra = the
    same over columns (each class's scores across the batch); T^2 * (beta*inter + gamma*intra)."""
    T = temperature
    p_s, p_t = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    inter = 1 - _row_pearson(p_s, p_t).mean()
    intra = 1 - _row_pearson(p_s.t(), p_t.t()).mean()
    return (beta * inter + gamma * intra) * (T * T)


class Taps:
    """The outputs of a network's named modules (its family's Network.taps: each stage's
    output, where attention transfer compares student and teacher), caught by forward hooks
    while taps(model, x) runs (torchdistill's way): no model returns anything special for
    distillation. The hooks stay on the network but keep nothing outside such a call."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"{type(model).__name__} has no module {missing[0]} to take an "
                            "attention-transfer point from (its family's taps)")
        self.names, self.caught, self.armed = tuple(names), {}, False
        for name in self.names:
            modules[name].register_forward_hook(self._catch(name))

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Taps":
        return cls(model, Network.of(model).taps)

    def _catch(self, name: str):
        def hook(module, inputs, output):
            if self.armed:
                self.caught[name] = output
        return hook

    def __call__(self, model, x: torch.Tensor):
        """(logits, [output of each tap, in order]) of model(x); `model` is the hooked network
        or a wrapper of it (DistributedDataParallel)."""
        self.armed = True
        try:
            logits = logits_of(model(x))
            return logits, [self.caught[n] for n in self.names]
        finally:
            self.armed = False
            self.caught.clear()


@dataclass(frozen=True)
class DistillTerm:
    fn: Callable
    flags: Dict[str, tuple] = field(default_factory=dict)
    about: str = ""


def _at_term(s, t, targets, hp, epoch):
    # beta' = beta * 3 / pairs: the original's weighting, tuned for the three WRN groups.
    # fp32: x^2 can overflow fp16.
    losses = [at_loss(a.float(), b.float()) for a, b in zip(s[1], t[1])]
    return hp.beta * 3 / len(losses) * sum(losses)


def _kd_term(s, t, targets, hp, epoch):
    # Hinton KD takes the share alpha of the cross-entropy: CE + this = distillation().
    T, ce = hp.temperature, F.cross_entropy(s[0], targets)
    kl = F.kl_div(F.log_softmax(s[0] / T, 1), F.softmax(t[0] / T, 1), reduction="batchmean")
    return hp.alpha * (2 * T * T * kl - ce)


def _dkd_term(s, t, targets, hp, epoch):
    # linear warm-up over the first dkd_warmup epochs, as mdistiller (epochs count from 1)
    ramp = min(epoch / hp.dkd_warmup, 1.0) if hp.dkd_warmup > 0 else 1.0
    return ramp * dkd_loss(s[0], t[0], targets, hp.dkd_alpha, hp.dkd_beta, hp.dkd_temperature)


def _dist_term(s, t, targets, hp, epoch):
    return dist_loss(s[0], t[0], hp.dist_beta, hp.dist_gamma, hp.dist_temperature)


DISTILL_TERMS: Dict[str, DistillTerm] = {
    "at": DistillTerm(_at_term, about="attention transfer (--beta)"),
    "kd": DistillTerm(_kd_term, about="Hinton KD (--alpha, --temperature)"),
    "dkd": DistillTerm(_dkd_term, {
        "dkd_alpha": (at_least(0, float), 1.0, "DKD: weight of TCKD"),
        "dkd_beta": (at_least(0, float), 6.0, "DKD: weight of NCKD (6: mdistiller's WRN-40-2 teacher configs; "
                                 "the paper's general CIFAR value is 8)"),
        "dkd_temperature": (positive(), 4.0, "DKD: temperature"),
        "dkd_warmup": (at_least(0), 20, "DKD: epochs of linear warm-up of its weight (0: none)")},
        "decoupled KD"),
    "dist": DistillTerm(_dist_term, {
        "dist_beta": (at_least(0, float), 1.0, "DIST: weight of the inter-class (per sample) relation"),
        "dist_gamma": (at_least(0, float), 1.0, "DIST: weight of the intra-class (per class) relation"),
        "dist_temperature": (positive(), 1.0, "DIST: temperature")},
        "DIST, Pearson-correlation KD"),
}


# DIST's CIFAR-100 recipe (hunto/image_classification_sota configs/strategies/distill/
# dist_cifar.yaml, used by hunto/DIST_KD): DIST(beta=1, gamma=1, tau=4) with loss weight 2 beside
# cross-entropy weight 1, i.e. beta = gamma = 2, T = 4. main.py's --dist_cifar selects it.
DIST_CIFAR = {"dist_beta": 2.0, "dist_gamma": 2.0, "dist_temperature": 4.0}


def term_default(flag: str):
    """The default of a distillation term's hyper-parameter (stated once, in DISTILL_TERMS)."""
    return next(t.flags[flag][1] for t in DISTILL_TERMS.values() if flag in t.flags)


KD_ALPHA = 0.9   # Hinton KD's usual weight (the original's), when --distill names kd alone


def resolve_distill(cfg, saved: Optional[dict], say: Callable = print):
    """The settled --distill of a training record (engine.TrainConfig), before anything is
    written. A checkpoint from before --distill resumes with the loss it was trained with: at,
    +kd when its alpha > 0. `say` prints the defaults it chose (engine passes rt.print: one
    line, not one per torchrun process)."""
    if saved is not None and "distill" not in saved:
        cfg = cfg.replace(distill=None)
    if cfg.distill is None:
        cfg = cfg.replace(distill="at+kd" if cfg.alpha > 0 else "at")
    names = parse_distill(cfg.distill)
    if "kd" in names and cfg.alpha == 0:
        say(f"--distill {cfg.distill}: kd takes its usual weight, --alpha {KD_ALPHA} "
            "(pass --alpha to choose another)")
        cfg = cfg.replace(alpha=KD_ALPHA)
    if ("kd" in names) != (cfg.alpha > 0):
        raise UserError(f"--alpha is the weight of kd: with --distill {cfg.distill} give "
                        + ("--alpha > 0 (e.g. 0.9)" if "kd" in names else
                           f"--alpha 0, or add kd (--distill {cfg.distill}+kd)"))
    if cfg.dist_cifar:
        for key, value in DIST_CIFAR.items():
            if getattr(cfg, key) not in (term_default(key), value):
                raise UserError(f"--dist_cifar sets --{key} {value:g}: drop one of them")
        cfg = cfg.replace(**DIST_CIFAR)
    return cfg


def parse_distill(spec: str) -> List[str]:
    """'at+dkd' -> ['at', 'dkd']; UserError for an unknown or repeated name."""
    names = spec.split("+")
    for name in names:
        if name not in DISTILL_TERMS:
            raise UserError(f"--distill {spec}: unknown method {name!r}; choose from "
                            f"{', '.join(DISTILL_TERMS)} or a sum such as at+dkd")
    if len(set(names)) < len(names):
        raise UserError(f"--distill {spec} names a method twice")
    return names


def distill_loss(names: Sequence[str], student, teacher, targets, hp, epoch: int = 1):
    """Cross-entropy + the sum of the named DISTILL_TERMS. student/teacher: (logits, acts)."""
    s, t = (student[0].float(), student[1]), (teacher[0].float(), teacher[1])
    loss = F.cross_entropy(s[0], targets)
    for name in names:
        loss = loss + DISTILL_TERMS[name].fn(s, t, targets, hp, epoch)
    return loss
