"""The networks of a training run: a new teacher or student (its family from the flags, its
blocks from the genotype), the frozen teacher a student learns from, and weights from a file.

A teacher of a student is one of our checkpoints (-t NAME) or a weights file
(--teacher_weights FILE). A new teacher may start from a weights file (--init_weights FILE), a
new student from its teacher's weights (--inherit: every tensor of the same name and shape).
A weights file is what torchvision writes (`torch.save(model.state_dict(), FILE)`), the same
wrapped in a dict under "state_dict" or "model" (the usual training scripts' form), or one of our
checkpoints; read_weights takes each.

    teacher = load_teacher(cfg)                  # a Teacher: model (frozen), its recorded error
    model = new_model(cfg, num_classes, teacher.model)
    initial_weights(model, cfg, teacher, print)  # --init_weights / --inherit, one line each
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from blockswap.files import (CHECKPOINT_KEYS, RunPaths, load_checkpoint, log_of,
                             model_from_checkpoint)
from models import Network, UserError, get_block_type

# The flags that belong to one mode (teacher or student) and what each does.
MODE_FLAGS = {"init_weights": ("teacher", "starts a new teacher from a weights file"),
              "teacher_weights": ("student", "names a student's teacher by its weights file"),
              "inherit": ("student", "starts a student from its teacher's weights")}

# Where a weights file keeps its state dict: ours under "net" (a checkpoint), the usual training
# scripts' under "state_dict" or "model"; torchvision's file is the state dict itself.
STATE_KEYS = ("net", "state_dict", "model")

# The settings that decide which images a validation error was measured on: a teacher's
# recorded error is reused only when the student validates on the same (same_validation).
VAL_KEYS = ("dataset", "data_loc", "val_subset", "image_size")


def check_mode_flags(cfg) -> None:
    """Refuse a flag of the other mode, and a weights file that is not there, before any work."""
    for flag, (mode, what) in MODE_FLAGS.items():
        value = getattr(cfg, flag)
        if value and cfg.mode != mode:
            raise UserError(f"--{flag} {what}: drop it, or train a {mode}")
        if isinstance(value, str) and value and not os.path.isfile(value):
            raise UserError(f"--{flag} {value}: file not found")


def genotype_arg(cfg):
    """The genotype's list of block names (convs), else the --conv name (uniform network),
    else None: the family's unmodified network (models.Family.plain)."""
    if cfg.convs:
        if cfg.moonshine:
            raise UserError("--moonshine is a uniform student of --conv blocks: drop "
                            "--from_genotype or --moonshine")
        return list(cfg.convs)
    if cfg.conv is not None:
        get_block_type(cfg.conv)   # validated here, after --module has registered its names
    return cfg.conv


def new_model(cfg, num_classes: int, teacher: Optional[nn.Module]) -> nn.Module:
    """A fresh teacher (shape from the flags) or student (the teacher's shape unless
    --diff_shape) with the genotype from --from_genotype or --conv."""
    convs = genotype_arg(cfg)
    net = Network.from_args(cfg, num_classes) if teacher is None \
        else student_network(cfg, Network.of(teacher))
    try:
        return net.build(convs)
    except UserError as e:
        where = (f"--from_genotype {cfg.from_genotype}" if cfg.from_genotype else
                 "the genotype" if cfg.convs else "--conv")
        raise UserError(f"{where}: {e}") from None


def student_network(cfg, teacher: Network) -> Network:
    """The teacher's network, or a WRN of --stu_depth/--stu_width with --diff_shape."""
    if cfg.arch not in (None, teacher.arch):
        raise UserError(f"--arch {cfg.arch} does not match the teacher ({teacher.arch}): a "
                        "student has its teacher's family")
    given = (cfg.wrn_depth or teacher.depth, cfg.wrn_width or teacher.width)
    if teacher.family.sized and given != (teacher.depth, teacher.width):
        raise UserError(f"--wrn_depth/--wrn_width {given[0]}/{given[1]} do not match the "
                        f"teacher checkpoint ({teacher.name}); for a student of another "
                        "shape use --diff_shape --stu_depth D --stu_width W")
    if not cfg.diff_shape:
        return teacher
    if not teacher.family.sized:
        raise UserError("--diff_shape is for WRN students only")
    return Network(teacher.arch, cfg.stu_depth, cfg.stu_width, teacher.num_classes)


# --------------------------------------------------------------------------------------------
# The teacher of a student
# --------------------------------------------------------------------------------------------

@dataclass
class Teacher:
    """A student's frozen teacher (eval mode, no gradients), what the messages call it, the
    settings it was trained with ({} for a weights file) and its last validation error as its
    checkpoint records it (None: not recorded)."""
    model: nn.Module
    label: str
    args: Dict = field(default_factory=dict)
    val_error: Optional[float] = None


def load_teacher(cfg) -> Teacher:
    """The frozen teacher: --teacher_weights FILE, else our checkpoint -t NAME."""
    if cfg.teacher_weights:
        state, ckpt = read_weights(cfg.teacher_weights, "--teacher_weights")
        teacher = checkpoint_teacher(ckpt, cfg.teacher_weights) if ckpt is not None \
            else teacher_from_state(cfg, state)
    else:
        path = RunPaths.of(cfg.checkpoint_dir, cfg.teacher_checkpoint).checkpoint
        if not os.path.isfile(path):
            raise UserError(f"teacher checkpoint {path} not found: train it first (python "
                            f"main.py {cfg.dataset} teacher -t {cfg.teacher_checkpoint} ...), "
                            f"pass -t NAME of a checkpoint in {cfg.checkpoint_dir}/, or "
                            "--teacher_weights FILE")
        teacher = checkpoint_teacher(load_checkpoint(path), path)
    teacher.model.requires_grad_(False)
    teacher.model.eval()
    return teacher


def checkpoint_teacher(ckpt: dict, path: str) -> Teacher:
    """A teacher from one of our checkpoints: its network, settings and last validation error
    (its "val_error", else its log's last row)."""
    log = log_of(ckpt)
    recorded = ckpt.get("val_error", log[-1]["val_error"] if log else None)
    return Teacher(model_from_checkpoint(ckpt, path), path, ckpt.get("args") or {},
                   None if recorded in (None, "") else float(recorded))


def teacher_from_state(cfg, state: Dict[str, torch.Tensor]) -> Teacher:
    """A teacher from a state dict: the unmodified network of --arch (else the data set's
    default family) with the file's class count (its classifier's rows) and weights."""
    net = Network.from_args(cfg)
    model = net.build()
    head = classifier_keys(model)
    classes = state[head[0]].shape[0] if head and head[0] in state else net.classes
    if classes != net.classes:
        model = Network(net.arch, net.depth, net.width, classes).build()
    load_weights(model, state, cfg.teacher_weights, "--teacher_weights")
    return Teacher(model, cfg.teacher_weights)


def check_teacher_classes(teacher: Teacher, num_classes: int, cfg) -> None:
    """The teacher must know the data set's classes (before any image is decoded)."""
    have = Network.of(teacher.model).classes
    if have == num_classes:
        return
    fix = (f": fine-tune it on these images first (main.py {cfg.dataset} teacher --arch "
           f"{Network.of(teacher.model).arch} --init_weights {cfg.teacher_weights} ...)"
           if cfg.teacher_weights else "")
    raise UserError(f"{teacher.label} has {have} classes but {cfg.dataset} at "
                    f"{cfg.data_loc} has {num_classes}{fix}")


def same_validation(saved: Dict, cfg) -> bool:
    """Whether a teacher trained with the settings `saved` was validated on the images `cfg`
    validates on (same data set, folder, subset and its seed, image size)."""
    seed = lambda a: a.get("subset_seed") if a.get("subset_seed") is not None \
        else a.get("seed")   # noqa: E731
    mine = {k: getattr(cfg, k) for k in VAL_KEYS}
    mine["seed"], mine["subset_seed"] = cfg.seed, cfg.subset_seed
    return all(saved.get(k) == mine[k] for k in VAL_KEYS) and seed(saved) == seed(mine)


# --------------------------------------------------------------------------------------------
# Weights from a file
# --------------------------------------------------------------------------------------------

def read_weights(path: str, flag: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, our checkpoint or None) of a weights file (see the module's docstring);
    DataParallel's `module.` prefix is dropped. Loaded with weights_only: a pickle must never
    run code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch file, truncated, or holds arbitrary objects
        raise UserError(f"{flag} {path} is not a readable weights file ({type(e).__name__}): "
                        "save one with torch.save(model.state_dict(), FILE)") from None
    key = next((k for k in STATE_KEYS if isinstance(saved, dict)
                and isinstance(saved.get(k), dict)), None)
    state = saved[key] if key else saved
    if not (isinstance(state, dict) and state
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{flag} {path} holds no state dict (a dict of tensors, as "
                        "model.state_dict() gives, alone or under 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    ours = key == "net" and all(k in saved for k in CHECKPOINT_KEYS)   # else another code's
    return state, (saved if ours else None)


def classifier_keys(model: nn.Module) -> List[str]:
    """The state-dict keys of the network's classifier: its last Linear layer."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    return [f"{name[0]}.{p}" for p, _ in model.get_submodule(name[0]).named_parameters()] \
        if name else []


def first_difference(own: Dict, state: Dict) -> Optional[str]:
    """How `state` fails to fit a network whose state dict is `own`, at the first key in the
    network's order (then the file's), or None when every key and shape agrees."""
    for k, v in own.items():
        if k not in state:
            return f"{k} is missing from the file"
        if tuple(state[k].shape) != tuple(v.shape):
            return (f"{k} is {list(state[k].shape)} in the file, {list(v.shape)} in the "
                    "network")
    extra = next((k for k in state if k not in own), None)
    return f"the file has {extra}, which the network has not" if extra else None


def load_weights(model: nn.Module, state: Dict, path: str, flag: str,
                 new_head: bool = False) -> List[str]:
    """Load a file's weights into `model`. new_head: a classifier of another class count is
    left at its fresh initialisation (its keys returned); any other difference is one error
    line naming the first differing key."""
    own = model.state_dict()
    head = classifier_keys(model) if new_head else []
    redo = [k for k in head if k in state and state[k].shape != own[k].shape]
    kept = {k: v for k, v in state.items() if k not in redo}
    wrong = first_difference({k: v for k, v in own.items() if k not in redo}, kept)
    if wrong:
        raise UserError(f"{flag} {path} does not fit {Network.of(model).name}: {wrong}")
    model.load_state_dict(kept, strict=not redo)
    return redo


def initial_weights(model: nn.Module, cfg, teacher: Optional[Teacher],
                    say: Callable = print) -> None:
    """A new network's starting weights: --init_weights (a teacher), --inherit (a student);
    else it keeps its initialisation. One line says what was taken."""
    if cfg.init_weights:
        state = read_weights(cfg.init_weights, "--init_weights")[0]
        redo = load_weights(model, state, cfg.init_weights, "--init_weights", new_head=True)
        if redo:
            say(f"--init_weights {cfg.init_weights}: its classifier has "
                f"{state[redo[0]].shape[0]} classes, {cfg.dataset} has "
                f"{Network.of(model).classes}: {', '.join(redo)} start afresh")
    if cfg.inherit and teacher is not None:
        n, total = inherit(model, teacher.model)
        say(f"--inherit: {n} of the student's {total} tensors start from the teacher's (same "
            f"name and shape), the other {total - n} from scratch")


def inherit(student: nn.Module, teacher: nn.Module) -> Tuple[int, int]:
    """Copy into `student` every teacher tensor (parameter or buffer) whose name and shape it
    shares; (copied, the student's tensor count)."""
    own = student.state_dict()
    same = {k: v for k, v in teacher.state_dict().items()
            if k in own and own[k].shape == v.shape}
    student.load_state_dict(same, strict=False)
    return len(same), len(own)
