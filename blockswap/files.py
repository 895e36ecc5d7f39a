"""Files a run reads and writes: genotype CSVs, checkpoints, results tables. Every rewrite is
atomic (a temporary file renamed over the old one); a pid lock keeps two runs off one file."""
import ast
import contextlib
import csv
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from models.archs import Network
from models.blocks import UserError, get_block_type


def check_writable(folder: str, flag: str) -> None:
    """UserError naming `folder` when files cannot be written there (or in the nearest existing
    folder above it, where it would be made), so a run fails before any work, not after."""
    d = os.path.abspath(folder)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{flag} {folder}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: the folder {d} is not writable (read-only); "
                        f"pass another {flag}")


def atomic_write(path: str, write) -> None:
    """Write a file through `write(f)` into a temporary file, then rename over `path`, so a
    crash never leaves a half-written file (and never truncates an existing one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, _file_mode(path))   # mkstemp's 0600 would make every output private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def pid_lock(path: str, what: str):
    """Hold `path` (created exclusively, holding "<pid> <host>") while the body runs, so two
    runs never write `what` at once. The lock of a process that died on this host (killed,
    crashed) is taken over with a message; a live one is a UserError."""
    host = socket.gethostname()
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid, _, owner = f.read().strip().partition(" ")
            except FileNotFoundError:   # released meanwhile: try again
                continue
            # a torn lock (no pid) or a dead process of this host: stale
            stale = not pid.isdigit() or (owner == host and not _pid_alive(int(pid)))
            if attempt == 2 or not stale:
                where = "" if owner == host else f" on {owner}"
                raise UserError(f"another run (process {pid or '?'}{where}) is writing {what}: "
                                f"wait for it to finish, or remove {path} if it is gone") from None
            print(f"{path}: taking over the stale lock of process {pid or '?'} (not running)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    else:
        raise UserError(f"{path}: could not take the lock for {what}; try again")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
    try:
        yield path
    finally:
        os.remove(path)


def _file_mode(path: str) -> int:
    """The mode a plain open(path, "w") gives: an existing file's own, else 0666 less the umask."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0o022)   # the only way to read it is to set it; set back at once
    os.umask(umask)
    return 0o666 & ~umask


_LEGACY_CLASS = re.compile(r"<class\s+'models\.blocks\.(\w+)'>")


def parse_convs(cell: str, where: str = "genotype") -> List[str]:
    """A `convs` cell -> list of block names (validated)."""
    text = cell.strip()
    if "<class" in text:
        names = _LEGACY_CLASS.findall(text)
        leftover = _LEGACY_CLASS.sub("", text).strip("[] \n\t,")
        if not names or leftover:
            raise UserError(f"{where}: cannot read the convs cell {cell!r}")
    else:
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"{where}: cannot read the convs cell {cell!r} "
                            "(expected a list such as ['Conv', 'DConvA4', ...])") from None
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: the convs cell {cell!r} is not a list of block names")
        names = list(names)
    for n in names:
        try:
            get_block_type(n)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return names


def format_convs(genotype: Sequence[str]) -> str:
    """The `convs` cell of a genotype: a Python list literal, as parse_convs reads it back."""
    return repr([str(n) for n in genotype])


def load_genotype(path: str) -> List[str]:
    """The genotype (list of block names) in the first row of a genotype CSV."""
    if os.path.isdir(path):
        raise UserError(f"genotype file {path} is a directory, not a CSV file")
    if not os.path.isfile(path):
        raise UserError(f"genotype file {path} not found")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not rows or "convs" not in rows[0]:
        raise UserError(f"{path}: expected a CSV with a 'convs' column and at least one row")
    return parse_convs(rows[0]["convs"] or "", where=f"{path}, row 1, column convs")


def save_genotype(path: str, genotype: Sequence[str], fisher: float = 0.0, index: int = 0,
                  rank: Optional[int] = None):
    """Write a genotype CSV in the paper repository's form (atomically); a search adds the
    candidate's `rank` (1 = best) as a last column."""
    genotype = [get_block_type(n).name for n in genotype]
    head, tail = (",rank", f",{rank}") if rank is not None else ("", "")

    def write(f):
        text = (f",index,convs,fisher{head}\n"
                + f'0,{index},"{format_convs(genotype)}",{float(fisher)!r}{tail}\n')
        f.write(text.encode())
    atomic_write(path, write)


def arch_info(model: nn.Module) -> dict:
    """What rebuilds `model` (models.archs.Network and its convs), as plain values."""
    net = Network.of(model)
    return {"arch": net.arch, "depth": net.depth, "width": net.width,
            "num_classes": net.num_classes, "convs": list(model.genotype)}


def model_from_checkpoint(ckpt: dict, path: str) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    try:
        net = Network(ckpt.get("arch", "wrn"), ckpt.get("depth"), ckpt.get("width"),
                      ckpt["num_classes"])
        model = net.build(ckpt["convs"])
    except UserError as e:
        hint = f" (it was trained with --module {ckpt['module']})" if ckpt.get("module") else ""
        raise UserError(f"{path}: {e}{hint}") from None
    try:
        model.load_state_dict(ckpt["net"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit its recorded architecture "
                        f"({str(e).splitlines()[0]})") from None
    return model


CHECKPOINT_KEYS = ("net", "epoch", "convs", "num_classes")   # what save_checkpoint always writes


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by save_checkpoint; UserError if missing, corrupt or foreign.
    weights_only=True: a checkpoint is a pickle and loading must never run code from it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds arbitrary Python objects
        raise UserError(f"{path} is not a readable checkpoint (not a checkpoint written by "
                        f"main.py: {type(e).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] \
        if isinstance(ckpt, dict) else ["net"]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this code (no {', '.join(missing)})")
    return ckpt


def save_checkpoint(path: str, state: dict) -> None:
    """Temporary file then rename: a kill during the save leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def whole_lines(path: str, repair: bool = True) -> str:
    """The text of a file written a line at a time (results, logs, a study), without a torn
    last line (a kill mid-write); with `repair`, the file itself is cut back to its whole lines
    (atomically), so the next appended row starts on a line of its own. Missing file: ''."""
    if not os.path.isfile(path):
        return ""
    with open(path, newline="", errors="replace") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]      # the line a kill interrupted
        if repair:
            atomic_write(path, lambda f: f.write(text.encode()))
    return text



# --------------------------------------------------------------------------------------------
# A training run's files (engine.py): the checkpoint, the per-epoch log CSV and its picture.
# --------------------------------------------------------------------------------------------
LOG_FIELDS = ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "seconds")


# The per-epoch lists a checkpoint also carries (older readers, plots.py), from the log rows.
HISTORY = {"train_losses": "train_loss", "train_errors": "train_error",
           "val_losses": "val_loss", "val_errors": "val_error"}


def log_of(ckpt: dict) -> List[dict]:
    """A checkpoint's log rows; a checkpoint without them (an early version) gets rows rebuilt
    from its per-epoch lists, lr and seconds unknown."""
    if ckpt.get("log"):
        return list(ckpt["log"])
    lists = [ckpt.get(key, []) for key in HISTORY]
    return [dict(zip(LOG_FIELDS, (e + 1, "", *values, ""))) for e, values in
            enumerate(zip(*lists))]


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: <folder>/<name>.t7 (checkpoint), .log.csv and .png (curves)."""
    checkpoint: str
    log: str
    plot: str

    @classmethod
    def of(cls, folder: str, name: str) -> "RunPaths":
        return cls(*(os.path.join(folder, name + ext) for ext in (".t7", ".log.csv", ".png")))


def write_log(path: str, rows) -> None:
    """Start the log afresh (atomically): header and the rows of a resumed checkpoint."""
    def write(f):
        text = ",".join(LOG_FIELDS) + "\n" + "".join(
            ",".join(str(r[k]) for k in LOG_FIELDS) + "\n" for r in rows)
        f.write(text.encode())
    atomic_write(path, write)


def append_log(path: str, row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS, lineterminator="\n").writerow(row)   # as write_log
        f.flush()
        os.fsync(f.fileno())
