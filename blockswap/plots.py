"""Pictures of a BlockSwap run: the search, a training log, a sweep, a proxy study.

    python plots.py search results/fisher_at_800000.csv [-o out.png] [--param_goal P]
    python plots.py training checkpoints/<name>.log.csv
    python plots.py sweep sweep.csv                          (columns name, params, error[, method])
    python plots.py study study.csv [--error val_error]      (one column per proxy)

Each function writes a PNG (parent folders created, written atomically) and returns its path;
the default output is the input path with a .png extension. Figures are built with
matplotlib's object API (Figure + Agg canvas), never pyplot: no display, no global figure
state, nothing left open.
"""
import io
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from matplotlib.ticker import FuncFormatter

from blockswap.ensembles import ProxySpec
from blockswap.files import atomic_write, load_checkpoint, whole_lines
from blockswap.funcs import Budget
from models.blocks import UserError, count_state_params
from blockswap.stats import spearman

DPI = 100
BEST_COLOUR, CLOUD_COLOUR, WINDOW_COLOUR = "tab:red", "tab:blue", "tab:green"


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

def new_figure(ncols: int, nrows: int = 1, panel=(6.0, 4.5)):
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, list(axes.flat)


def image_format(path: str) -> str:
    """The format a file name's suffix names (png, pdf, svg, ...); UserError if none is known."""
    suffix = os.path.splitext(path)[1][1:].lower()
    known = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in known:
        raise UserError(f"{path}: the suffix names no picture format matplotlib writes; use "
                        f"one of {', '.join('.' + k for k in sorted(known))}")
    return suffix


def save(fig: Figure, out_png: str) -> str:
    """Write the figure in the format its suffix names (atomically, folders created) and
    return the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format(out_png), dpi=DPI)
    atomic_write(out_png, lambda f: f.write(buf.getvalue()))
    return out_png


def human(x, _pos=None) -> str:
    """1234567 -> '1.23M', 800000 -> '800K' (axis ticks and labels)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def log_minor(fmt=lambda v: f"{v:g}"):
    """A minor-tick formatter for a log axis that labels only the 2s and 5s (20, 0.5, 200K)."""
    def label(v, _pos=None) -> str:
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
        return fmt(v) if mantissa in (2, 5) else ""
    return FuncFormatter(label)


def read_frame(table, what: str, required: Sequence[str]) -> pd.DataFrame:
    """A dataframe, or a CSV path, that must have the `required` columns."""
    if isinstance(table, pd.DataFrame):
        df = table.copy()
    else:
        if not os.path.isfile(table):
            raise UserError(f"{what} {table} not found")
        try:
            df = pd.read_csv(table)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{table}: not a readable CSV file ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{what}: missing column(s) {', '.join(missing)}; has "
                        f"{', '.join(map(str, df.columns))}")
    if df.empty:
        raise UserError(f"{what}: no rows to plot")
    return df


def auto_log(ax, values, axis: str):
    """Log scale when every value is positive and they span more than three decades."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) and v.min() > 0 and v.max() / v.min() > 1e3:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


# --------------------------------------------------------------------------------------------
# The search: score against parameters and MACs
# --------------------------------------------------------------------------------------------

def settings_beside(results) -> dict:
    """The settings fisher_rank.py wrote beside a results CSV (<stem>.json), or {}."""
    path = os.path.splitext(results)[0] + ".json" if isinstance(results, str) else None
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def score_column(df: pd.DataFrame, score: Optional[str], settings: dict) -> str:
    """The column to plot: `score`, else the first proxy of the search's settings."""
    if score is None and settings.get("proxy"):
        score = ProxySpec(settings["proxy"]).columns[0]
    if score is None:
        raise UserError("which column is the score? pass --score (no settings file beside the "
                        "results names the search's proxy)")
    if score not in df.columns:
        raise UserError(f"no column {score!r} in the results; has {', '.join(df.columns)}")
    return score


def running_best(scores: Sequence[float]) -> np.ndarray:
    """Positions (in scoring order) where a new best (highest) score was found."""
    s = np.asarray(scores, dtype=float)
    best, rows = -np.inf, []
    for i, v in enumerate(s):
        if v > best:
            best = v
            rows.append(i)
    return np.array(rows, dtype=int)


def plot_search(results, out_png: str, score: Optional[str] = None,
                goals: Optional[dict] = None) -> str:
    """Score against params (and MACs, predicted latency) for every scored candidate, in
    scoring (file) order: the running best joined up, the final best starred, the budget
    window shaded. goals: {'param_goal', 'mac_goal', 'latency_goal', 'tol'}, by default from
    the search's settings beside `results`; given ones replace those."""
    settings = settings_beside(results)
    goals = {**{k: settings.get(k) for k in GOALS}, **{k: v for k, v in (goals or {}).items()
                                                         if v is not None}}
    df = read_frame(results, "search results", ["params"])
    col = score_column(df, score, settings)
    df = df[np.isfinite(pd.to_numeric(df[col], errors="coerce"))].reset_index(drop=True)
    if df.empty:
        raise UserError(f"search results: no finite {col} values to plot")
    bests = running_best(df[col])
    best = df.iloc[bests[-1]]
    label = df["index"] if "index" in df.columns else pd.Series(df.index)
    tol = goals.get("tol") or Budget().tol    # the budget flags' default
    xs = [(x, xlabel, goals.get(goal)) for x, xlabel, goal in SEARCH_AXES if x in df.columns]
    fig, axes = new_figure(len(xs) + 1, panel=(5.2, 4.3))
    for ax, (x, xlabel, goal) in zip(axes, xs):
        if goal:
            ax.axvspan(goal * (1 - tol), goal * (1 + tol), color=WINDOW_COLOUR, alpha=0.12,
                       label=f"budget window {human(goal)} \u00b1{tol:.1%}")
            ax.axvline(goal, color=WINDOW_COLOUR, lw=1, ls="--")
        ax.scatter(df[x], df[col], s=10, alpha=0.45, color=CLOUD_COLOUR, lw=0,
                   label=f"candidates ({len(df)})")
        ax.scatter(df[x].iloc[bests], df[col].iloc[bests], s=28, color=BEST_COLOUR,
                   edgecolor="black", lw=0.5, zorder=4, label=f"new bests ({len(bests)})")
        ax.scatter([best[x]], [best[col]], marker="*", s=280, color=BEST_COLOUR,
                   edgecolor="black", lw=0.6, zorder=5, label="best")
        ax.annotate(f"#{label.iloc[bests[-1]]}: {human(best[x])} {xlabel}",
                    (best[x], best[col]), xytext=(0, 12), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.7", alpha=0.9))
        ax.xaxis.set_major_formatter(FuncFormatter(human))
        ax.set_xlabel(xlabel)
    scoring_order_panel(axes[-1], df[col], bests)
    finish_search_figure(fig, axes, df[col])
    fig.suptitle(f"search: {len(df)} candidates scored; best #{label.iloc[bests[-1]]}: "
                 f"{col} {best[col]:.4g}, {human(best['params'])} params"
                 + (f", {human(best['macs'])} MACs" if "macs" in df.columns else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, out_png)


GOALS = ("param_goal", "mac_goal", "latency_goal", "tol")
# (results column, axis label, the goal that shades its window)
SEARCH_AXES = (("params", "parameters", "param_goal"), ("macs", "MACs", "mac_goal"),
               ("latency_ms", "predicted latency (ms)", "latency_goal"))


def scoring_order_panel(ax, scores: pd.Series, bests: np.ndarray) -> None:
    """The score in scoring order, the best so far as a step line, the best starred."""
    order = np.arange(1, len(scores) + 1)
    ax.scatter(order, scores, s=8, alpha=0.45, color=CLOUD_COLOUR, lw=0)
    ax.step(order, np.maximum.accumulate(scores.to_numpy(dtype=float)), where="post",
            color=BEST_COLOUR, lw=1.5, label="best so far")
    ax.scatter(order[bests], scores.iloc[bests], s=28, color=BEST_COLOUR, edgecolor="black",
               lw=0.5, zorder=4)
    ax.scatter([order[bests[-1]]], [scores.iloc[bests[-1]]], marker="*", s=280,
               color=BEST_COLOUR, edgecolor="black", lw=0.6, zorder=5)
    ax.set_xlabel("candidates scored")


def finish_search_figure(fig: Figure, axes, scores: pd.Series) -> None:
    """Shared y axes (log when the scores span decades) and one legend under the panels."""
    for ax in axes:
        auto_log(ax, scores, "y")
        ax.set_ylabel(scores.name)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(axes[-1].get_legend_handles_labels()[0][0])
    labels.append("best so far")
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------

def read_log(log_path) -> pd.DataFrame:
    """A training log (main.py's <name>.log.csv); a half-written last line (a run killed
    mid-write) is skipped; a resumed run's repeated epochs keep the last row."""
    if isinstance(log_path, pd.DataFrame):
        df = log_path.copy()
    else:
        if not os.path.isfile(log_path):
            raise UserError(f"training log {log_path} not found")
        text = whole_lines(log_path, repair=False)   # a reader leaves the file as it is
        try:
            df = pd.read_csv(io.StringIO(text), on_bad_lines="skip")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{log_path}: not a CSV log ({e})") from None
    if "epoch" not in df.columns or df.empty:
        raise UserError(f"training log {log_path}: expected rows with an 'epoch' column "
                        "(epoch, lr, train_loss, train_error, val_loss, val_error, seconds)")
    df = df.apply(pd.to_numeric, errors="coerce").dropna(subset=["epoch"])
    return df.drop_duplicates("epoch", keep="last").sort_values("epoch")


def plot_training(log_path, out_png: str) -> str:
    """Train/val error, train/val loss and learning rate per epoch."""
    df = read_log(log_path)
    fig, (ax_err, ax_loss, ax_lr) = new_figure(3, panel=(5.0, 4.0))
    for split, style in (("train", "--"), ("val", "-")):
        style += "o" if len(df) == 1 else ""   # a line of one point draws nothing: a marker
        if f"{split}_error" in df:
            ax_err.plot(df["epoch"], df[f"{split}_error"], style, label=split)
        if f"{split}_loss" in df:
            ax_loss.plot(df["epoch"], df[f"{split}_loss"], style, label=split)
    if "val_error" in df and df["val_error"].notna().any():
        i = df["val_error"].idxmin()
        e, v = df.loc[i, "epoch"], df.loc[i, "val_error"]
        ax_err.plot([e], [v], "o", color="tab:red", ms=6, label=f"best val {v:.4g} (epoch {e:g})")
    errors = df[[c for c in ("train_error", "val_error") if c in df]].to_numpy(dtype=float)
    percent = errors.size and np.nanmax(errors) > 1   # errors are saved in percent
    ax_err.set_ylabel("error (%)" if percent else "error")
    ax_loss.set_ylabel("loss (train: the objective, with AT/KD for students)")
    for ax in (ax_err, ax_loss):   # log y when the curve falls a decade: late epochs stay legible
        y = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[np.nan]])
        y = y[np.isfinite(y)]
        if len(y) and y.min() > 0 and y.max() / y.min() > 10:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(log_minor())
    if "lr" in df:
        ax_lr.plot(df["epoch"], df["lr"], "-o" if len(df) == 1 else "-", color="tab:purple")
        if (df["lr"] > 0).all():
            ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    for ax, title in ((ax_err, "error"), (ax_loss, "loss"), (ax_lr, "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    name = os.path.basename(str(log_path)) if not isinstance(log_path, pd.DataFrame) else ""
    last = df.iloc[-1]
    summary = f"{len(df)} epochs"
    if "val_error" in df:
        summary += f", final val error {last['val_error']:.4g}"
    if "seconds" in df and df["seconds"].notna().any():
        summary += f", {df['seconds'].sum() / 3600:.2f} h"
    fig.suptitle(f"{name}  ({summary})" if name else summary)
    fig.tight_layout()
    return save(fig, out_png)


# --------------------------------------------------------------------------------------------
# A sweep: final student error against parameters
# --------------------------------------------------------------------------------------------

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def pareto_front(params, error) -> np.ndarray:
    """Positions, in increasing params, of the runs no smaller run beats."""
    order = np.argsort(np.asarray(params, dtype=float), kind="stable")
    best, keep = np.inf, []
    for i in order:
        if error[i] < best:
            best = error[i]
            keep.append(i)
    return np.array(keep, dtype=int)


def place_labels(ax, xs, ys, texts, fontsize=7):
    """Label points without overlaps: try offsets in rings around each point and keep the
    first whose box stays inside the axes and hits no marker and no earlier label (greedy, in
    the given order); if none is free, the one with the least overlap."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    centres = ax.transData.transform(np.column_stack([xs, ys]))
    r = fontsize * 0.6 * ax.figure.dpi / 72            # about a marker's radius, in pixels
    placed = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    offsets = [(d * dx, d * dy, ha, va) for d in (1, 2, 3.5)
               for dx, dy, ha, va in ((6, 0, "left", "center"), (-6, 0, "right", "center"),
                                      (5, 7, "left", "bottom"), (5, -7, "left", "top"),
                                      (-5, 7, "right", "bottom"), (-5, -7, "right", "top"),
                                      (0, 8, "center", "bottom"), (0, -8, "center", "top"))]

    def overlap(box):
        clip = Bbox.intersection(box, frame)
        outside = box.width * box.height - (clip.width * clip.height if clip else 0)
        hits = (Bbox.intersection(box, b) for b in placed)
        return outside + sum(h.width * h.height for h in hits if h is not None)

    for x, y, text in zip(xs, ys, texts):
        best = None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va=va, fontsize=fontsize, color="0.2")
            box = ann.get_window_extent(renderer).expanded(1.04, 1.2)
            cost = overlap(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def collect_sweep(checkpoint_dir: str) -> pd.DataFrame:
    """One row per training run in a checkpoint folder: name, params, error (final val error,
    %), epochs, method (teacher; blockswap for a genotype student; moonshine for a uniform or
    reshaped student), finished (False while fewer epochs are done than the run asked for).
    A file that is not a checkpoint of main.py is skipped with a warning."""
    rows = []
    for name in sorted(os.listdir(checkpoint_dir)):
        if not name.endswith(".t7"):
            continue
        try:
            ckpt = load_checkpoint(os.path.join(checkpoint_dir, name))
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        if not ckpt.get("val_errors"):
            continue
        run_args = ckpt.get("args") or {}
        if run_args.get("mode") == "teacher":
            method = "teacher"
        else:
            method = "blockswap" if run_args.get("from_genotype") else "moonshine"
        params = count_state_params(ckpt["net"])
        rows.append({"name": os.path.splitext(name)[0], "params": params, "error": ckpt["val_errors"][-1],
                     "epochs": ckpt["epoch"], "method": method,
                     "finished": ckpt["epoch"] >= run_args.get("epochs", ckpt["epoch"])})
    if not rows:
        raise UserError(f"{checkpoint_dir}: no finished training runs (*.t7 with val errors)")
    return pd.DataFrame(rows)


def warn_unfinished(table: pd.DataFrame) -> None:
    """Say which runs of a sweep table stopped before their last epoch."""
    if "finished" in table and not table["finished"].all():
        names = ", ".join(table.loc[~table["finished"], "name"].astype(str))
        print(f"warning: unfinished runs (fewer epochs than asked; resume them with "
              f"main.py --resume): {names}", file=sys.stderr)


def plot_sweep(table, out_png: str) -> str:
    """Final error against parameters (log x), one labelled marker per run, a marker style per
    method (e.g. blockswap vs moonshine) and a line along each method's Pareto front (the best
    error at or under each size), as the paper's error-vs-params figure."""
    df = read_frame(table, "sweep table", ["name", "params", "error"])
    df = df.assign(method=df["method"].astype(str) if "method" in df else "run")
    df = df.sort_values("params").reset_index(drop=True)
    fig, (ax,) = new_figure(1, panel=(9.0, 6.0))
    for k, (method, g) in enumerate(df.groupby("method", sort=False)):
        marker = MARKERS[k % len(MARKERS)]
        line = ax.plot(g["params"], g["error"], marker, ms=7, alpha=0.9, label=method)[0]
        front = g.iloc[pareto_front(g["params"].to_numpy(), g["error"].to_numpy())]
        if len(front) > 1:
            ax.plot(front["params"], front["error"], "-", lw=1, alpha=0.6,
                    color=line.get_color())
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(human))
    ax.xaxis.set_minor_formatter(log_minor(human))
    ax.set_xlabel("parameters")
    ax.set_ylabel("error (%)" if df["error"].max() > 1 else "error")
    ax.margins(x=0.12, y=0.1)
    ax.grid(alpha=0.3, which="both")
    if df["method"].nunique() > 1 or df["method"].iloc[0] != "run":
        ax.legend(title="method (line: Pareto front)", fontsize=9, title_fontsize=9)
    ax.set_title(f"final student error against parameters ({len(df)} runs)")
    fig.tight_layout()
    place_labels(ax, df["params"], df["error"], df["name"].astype(str))
    return save(fig, out_png)


# --------------------------------------------------------------------------------------------
# A proxy study: each proxy's score against trained validation error
# --------------------------------------------------------------------------------------------

# Columns of a study table that are not proxy scores (study.py writes index, convs, params,
# macs, the proxies, score replicas 'name@r', per-seed errors 'val_error_r', val_error, seconds).
NOT_PROXIES = ("index", "convs", "macs", "latency_ms", "train_seconds")


def study_proxies(df: pd.DataFrame, error: str) -> list:
    """The proxy columns of a study table (params counts as a proxy)."""
    return [c for c in df.columns if c not in NOT_PROXIES and "@" not in str(c)
            and not str(c).startswith(error) and pd.api.types.is_numeric_dtype(df[c])]


def plot_study(df, out_png: str, error: str = "val_error", proxies=None) -> str:
    """One panel per proxy: score vs trained error, Spearman rho in the title (a good proxy is
    strongly negative: higher score, lower error)."""
    df = read_frame(df, "study table", [error])
    names = list(proxies) if proxies else study_proxies(df, error)
    missing = [p for p in names if p not in df.columns]
    if not names or missing:
        raise UserError(f"study table: no column for proxy {', '.join(missing) or 'any'}; "
                        f"columns: {', '.join(map(str, df.columns))}")
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = new_figure(ncols, nrows, panel=(4.5, 3.8))
    for ax, name in zip(axes, names):
        ok = np.isfinite(df[name].astype(float)) & np.isfinite(df[error].astype(float))
        x, y = df.loc[ok, name].astype(float), df.loc[ok, error].astype(float)
        ax.scatter(x, y, s=22, alpha=0.75, color=CLOUD_COLOUR, edgecolor="white", lw=0.5)
        auto_log(ax, x, "x")
        if ax.get_xscale() == "linear" and len(x) and x.abs().max() >= 1e4:
            ax.xaxis.set_major_formatter(FuncFormatter(human))
        ax.set_title(f"{name}: Spearman \u03c1 = {spearman(x, y):+.2f} (n={len(x)})", fontsize=10)
        ax.set_xlabel(name if name == "params" else f"{name} score")
        ax.set_ylabel(f"{error} (%)" if len(y) and y.max() > 1 else error)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"zero-cost proxies against trained {error}")
    fig.tight_layout()
    return save(fig, out_png)
