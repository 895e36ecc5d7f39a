"""Command-line glue shared by the scripts: one-line errors, --help with defaults."""
import argparse
import copy
import json
import math
import sys
import time
from typing import Callable, List, Optional, Sequence

from models.blocks import UserError


def run_cli(main, parser, argv: Optional[Sequence[str]] = None):
    """Parse, run main(args); a bad flag or a UserError ends as one line on stderr
    ('error: ...') and exit status 2; Ctrl-C (or SIGTERM where a job launcher turns it into
    one) as the line 'interrupted' and status 130, the shell's for SIGINT, not a traceback."""
    one_line_errors(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def user_message(e: UserError) -> str:
    """The one line of a UserError. One raised in a DataLoader worker (a damaged image) reaches
    the main process re-made with the worker's whole traceback as its text: its own message is
    the last line there."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    return text.rsplit("UserError: ", 1)[-1].strip().splitlines()[0]


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own errors (a bad value, a missing argument) as one line, without the usage
    block, naming --help; also for sub-commands."""
    name = parser.prog

    def error(message):
        print(f"error: {message} (see python {name} --help)", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                one_line_errors(sub)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, also for flags without a help text (argparse's own
    formatter shows it only beside a help text), unless the text already states one."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


def number(text: str, kind=float):
    """text as a `kind` (int or float), or argparse's error for it."""
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def at_least(low, kind=int):
    """argparse type: a number of `kind` >= low (NaN refused), checked at parse time."""
    def parse(text: str):
        value = number(text, kind)
        if not value >= low:   # `not >=`: NaN is refused too
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def positive(kind=float):
    """argparse type: a finite number > 0."""
    def parse(text: str):
        value = number(text, kind)
        if not (value > 0 and math.isfinite(value)):   # NaN fails too
            raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
        return value
    parse.__name__ = kind.__name__
    return parse


EPOCH_LIST_HINT = "expected a JSON list of epochs such as '[60,120,160]'"


def epoch_steps(text: str) -> Optional[List[int]]:
    """The epochs of an --epoch_step text (a JSON list of whole numbers >= 0), or None if it
    is not one: the one rule for the flag and for a TrainConfig built in code."""
    try:
        steps = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(steps, list) and all(type(s) is int and s >= 0 for s in steps)
    return steps if ok else None


def epoch_list(text: str) -> str:
    """argparse type of --epoch_step, checked at parse time; the text itself is kept (a
    checkpoint records it, and --resume compares)."""
    if epoch_steps(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: {EPOCH_LIST_HINT}")
    return text


class LogProgress:
    """A progress report for a log file (stderr not a terminal): one line per ~10% of `total`
    instead of tqdm's carriage-return redraws, which a log keeps as one endless line. On
    stdout, with the run's other notes: stderr keeps only a failed run's one `error:` line. Each
    line has the elapsed time and, once an item is done, the ETA at the mean rate so far, as the
    terminal bar does. The update/set_postfix/set_postfix_str/write/close subset of tqdm that
    the callers use."""

    def __init__(self, iterable=None, desc: str = "", total: Optional[int] = None,
                 disable: bool = False, step: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.disable = iterable, desc, disable
        self.clock, self.start = clock, clock()
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix, self.step = total, 0, "", step
        self.next_at = self._after(0)

    def _after(self, n: int) -> float:
        """The count of the next line: the next multiple of step * total (every item when the
        total is unknown or tiny)."""
        if not self.total:
            return n + 1
        every = max(1, math.ceil(self.step * self.total))
        return (n // every + 1) * every

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self):
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_at or (self.total and self.n >= self.total):
            self.next_at = self._after(self.n)
            self._print()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def _print(self) -> None:
        if self.disable:
            return
        of = f"{self.n}/{self.total} ({100 * self.n // self.total}%)" if self.total else str(self.n)
        elapsed = self.clock() - self.start
        times = f"elapsed {clock_time(elapsed)}"
        if self.total and 0 < self.n < self.total:
            times += f", ETA {clock_time(elapsed / self.n * (self.total - self.n))}"
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {of} [{times}{post}]", flush=True)

    def write(self, text: str) -> None:
        """A note between the progress lines (tqdm.write's place: stdout)."""
        print(text, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def clock_time(seconds: float) -> str:
    """M:SS, or H:MM:SS from an hour (tqdm's format)."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(iterable=None, desc: str = "", total: Optional[int] = None, disable: bool = False,
             **tqdm_kwargs):
    """A progress bar: tqdm on a terminal, LogProgress (a line per ~10% on stdout) when stderr
    is a file or a pipe, so that a log holds readable lines, not carriage-return redraws."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, disable=disable, **tqdm_kwargs)
    return LogProgress(iterable, desc, total, disable)
