"""The results store of searches and studies (search.py, fisher_rank.py, study.py): the rows
of candidates, appended one line at a time and read back (a torn last line cut off); the
settings file beside them, which a resumed run must match; the rule for a candidate's initial
weights that the settings record (so stored rows never silently change); and Candidates, the
one table of genotypes and costs that rows are made from."""
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from blockswap.files import atomic_write, format_convs, parse_convs, whole_lines
from models.blocks import UserError


# --------------------------------------------------------------------------------------------
# The one rule for a candidate's initial weights. Candidate `index` of a run seeded `seed`,
# initialisation `replica` (a study's --score_seeds/--train_seeds), starts from
# torch.manual_seed(candidate_key(...)). A run records the rule's version in its settings
# file and a resumed run keeps its own, so stored rows never silently change.
#   1: seed + index + 1000 replica  -- study.py's first rule (collides across seeds, and past
#      1000 candidates across replicas)
#   2: (replica * 1_000_003 + seed) * 1_000_003 + index + 1  -- distinct for every (seed,
#      index, replica) with 0 <= seed, index < 1_000_002; replica 0 is the search's rule since
#      its first version, so every stored search is rule 2
# --------------------------------------------------------------------------------------------

INIT_RULES = {1: lambda seed, index, replica: seed + index + 1000 * replica,
              2: lambda seed, index, replica: (replica * 1_000_003 + seed) * 1_000_003 + index + 1}
INIT_RULE = 2            # what a new search or study records
SEARCH_INIT_RULE = 2     # a search's settings file without `init_rule` (written before it)
STUDY_INIT_RULE = 1      # a study's settings file without `init_rule`


def candidate_key(seed: int, index: int, replica: int = 0, rule: int = INIT_RULE) -> int:
    """The seed of candidate `index`'s initialisation `replica` under `rule` (INIT_RULES)."""
    return INIT_RULES[rule](seed, index, replica)


def stored_rule(path: str, legacy: int) -> int:
    """The init rule of the run whose settings file is `path` (`legacy` when the file predates
    the rule's record), or INIT_RULE for a new run; a rule this version does not know is
    refused, in one line."""
    if not os.path.isfile(path):
        return INIT_RULE
    rule = read_settings(path).get("init_rule", legacy)
    if rule not in INIT_RULES:
        raise UserError(f"{path} records init_rule {rule!r}, which this version does not know "
                        f"(it knows {', '.join(map(str, INIT_RULES))}): resume it with the "
                        "version that started it, or move it away to start afresh")
    return rule


# --------------------------------------------------------------------------------------------
# Candidates: one table from sampling (or an archs file) through costing to the rows written
# --------------------------------------------------------------------------------------------

def predicted_latency(table, genotypes) -> Optional[np.ndarray]:
    """Each genotype's latency on the table's latency table (ms, 5 decimals as written), or
    None without a latency goal."""
    if table.latency is None:
        return None
    return np.array([round(table.latency.table.predict(g), 5) for g in genotypes])


@dataclass(frozen=True)
class Candidates:
    """The candidates of a search or a study, in order: their genotypes (block names) and
    their costs, computed once from the type codes they were drawn or read as; `source` is
    'sampled' or the archs file's 'sha256:<hash>'."""
    genotypes: List[List[str]]
    params: np.ndarray
    macs: np.ndarray
    latency_ms: Optional[np.ndarray]
    source: str

    @classmethod
    def of_rows(cls, table, genotypes, params, macs, source: str) -> "Candidates":
        """Candidates whose costs are already counted (an archs file's rows)."""
        return cls(genotypes, params, macs, predicted_latency(table, genotypes), source)

    @classmethod
    def of_codes(cls, table, codes: np.ndarray, source: str,
                 genotypes: Optional[List[List[str]]] = None) -> "Candidates":
        """Candidates of type codes (n, positions) into table.names (their genotypes, when
        already at hand, are not rebuilt)."""
        if genotypes is None:
            genotypes = [[table.names[t] for t in row] for row in codes]
        params, macs = table.cost_many(codes) if len(codes) else (np.zeros(0, np.int64),) * 2
        return cls(genotypes, params, macs, predicted_latency(table, genotypes), source)

    def __len__(self) -> int:
        return len(self.genotypes)

    def row(self, i: int) -> dict:
        """Candidate i's row: index, genotype and costs (and predicted latency)."""
        row = {"index": i, "convs": self.genotypes[i], "params": int(self.params[i]),
               "macs": int(self.macs[i])}
        if self.latency_ms is not None:
            row["latency_ms"] = float(self.latency_ms[i])
        return row

    def frame(self) -> pd.DataFrame:
        """An archs file's table: convs, params, macs (and latency_ms)."""
        df = pd.DataFrame({"convs": [format_convs(g) for g in self.genotypes],
                           "params": self.params, "macs": self.macs})
        if self.latency_ms is not None:
            df["latency_ms"] = self.latency_ms
        return df


# --------------------------------------------------------------------------------------------
# The results store
# --------------------------------------------------------------------------------------------

def read_rows(path, score_cols, columns: Optional[List[str]] = None) -> Dict[int, dict]:
    """{index: row} of a results CSV (a search's, a re-rank's, a study's): index, convs,
    params, macs, latency_ms if there, and `score_cols` as floats. A torn last line (a kill
    mid-write) is cut off; with `columns`, the header must be exactly those; a damaged row is
    a UserError naming the file and line."""
    text = whole_lines(path)
    if not text:
        return {}
    score_cols = [score_cols] if isinstance(score_cols, str) else score_cols
    reader = csv.DictReader(text.splitlines())
    if columns is not None and reader.fieldnames != list(columns):
        raise UserError(f"{path} has columns {reader.fieldnames}, this run writes {columns}: "
                        "pass another output folder, or move the file away")
    rows = {}
    for r in reader:
        row = parse_row(r, score_cols, f"{path}, line {reader.line_num}")
        rows[row["index"]] = row
    return rows


def parse_row(r: dict, score_cols, where: str) -> dict:
    """One CSV row (csv.DictReader's) as read_rows returns it."""
    try:
        row = {"index": int(r["index"]), "convs": parse_convs(r["convs"], where=f"{where}, convs"),
               "params": int(r["params"]), "macs": int(r["macs"]),
               **{c: float(r[c]) for c in score_cols}}
        if "latency_ms" in r:
            row["latency_ms"] = float(r["latency_ms"])
    except UserError as e:   # a bad convs cell, named by parse_convs
        raise UserError(f"{e}: repair or delete that line, or move the file away to start "
                        "afresh") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a results row ({type(e).__name__}: {e}): repair or "
                        "delete that line, or move the file away to start afresh") from None
    return row


class ResultsWriter:
    """Appends one CSV line per candidate, flushed and fsynced: a kill loses at most the
    candidate in flight. A file without a whole line (new, empty, or killed while its header
    was written) gets its header atomically first."""

    def __init__(self, path, columns):
        self.columns = columns
        if not whole_lines(path):
            atomic_write(path, lambda f: f.write((",".join(columns) + "\n").encode()))
        self.f = open(path, "a", newline="")
        self.writer = csv.writer(self.f, lineterminator="\n")

    def write_row(self, row):
        self.writer.writerow([row[c] if c != "convs" or isinstance(row[c], str)
                              else format_convs(row[c]) for c in self.columns])
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def write_rows(path, rows, columns):
    """Rewrite a results file atomically, rows in index order (used by the merge)."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(columns)
    for r in sorted(rows.values(), key=lambda r: r["index"]):
        w.writerow([format_convs(r[c]) if c == "convs" else r[c] for c in columns])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def check_settings(path, settings, added: Optional[dict] = None):
    """Write the run's settings beside its results, or check that a resumed run matches.
    `added`: settings recorded only since some version, with the value a file written before
    then implies (an older run resumes when it matches that)."""
    if os.path.isfile(path):
        old = {**(added or {}), **read_settings(path)}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            text = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise UserError(f"{path} records different settings ({text}): rerun with the same "
                            "settings to resume, or move the results file away to start afresh")
    else:
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def read_settings(path) -> dict:
    """The settings a run wrote beside its results; a damaged file is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        old = e
    if not isinstance(old, dict):
        raise UserError(f"{path} is not a readable settings file ({old}): it records the "
                        "settings of the results beside it; restore it from a backup, or move "
                        "it and those results away to start afresh")
    return old
