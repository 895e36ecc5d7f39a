"""Proxy lists and ensembles: `--proxy fisher,synflow,vote,rank:snip+meco` parsed once into a
ProxySpec; an ensemble is a ranking of a set of scored candidates, computed from their per-proxy
columns (so it exists only for a set of them, never for one network alone)."""
import numpy as np

from models.blocks import UserError
from blockswap.stats import rankdata


VOTE = ("synflow", "jacob_cov", "snip")   # zero-cost-nas's majority vote


def finite(scores) -> np.ndarray:
    """Scores as floats, NaN as -inf: a failed score ranks last (argsort would put NaN first)."""
    s = np.asarray(scores, dtype=float)
    return np.where(np.isnan(s), -np.inf, s)


def vote_scores(columns) -> np.ndarray:
    """Majority vote (zero-cost-nas, Abdelfattah et al. 2021): candidate a beats b when more
    than half of the proxies score a above b. zero-cost-nas only measures the pairwise accuracy
    of that vote; to rank, each candidate's score is its number of wins (a Copeland count)."""
    cols = [finite(c) for c in columns]
    above = sum((c[:, None] > c[None, :]).astype(int) for c in cols)   # (n, n) proxies for a>b
    return (above * 2 > len(cols)).sum(1).astype(float)


def mean_rank_scores(columns) -> np.ndarray:
    """Mean over the proxies of each candidate's rank (1 = lowest score; ties averaged)."""
    return np.mean([rankdata(finite(c)) for c in columns], axis=0)


def members(item: str):
    """The proxies an ensemble item combines ('vote', 'rank:a+b'), or None for a proxy name."""
    if item == "vote":
        return VOTE
    if item.startswith("rank:"):
        names = tuple(n for n in item[len("rank:"):].split("+") if n)
        if len(names) < 2:
            raise UserError(f"{item!r}: a rank ensemble needs two proxies or more, "
                            "e.g. rank:synflow+jacob_cov")
        if len(set(names)) < len(names):
            raise UserError(f"{item!r} names a proxy twice: each member once")
        return names
    return None


class ProxySpec:
    """A parsed --proxy value: `items` in the order given (the first ranks), `columns` the
    proxies to score (each once, in order of appearance), `label` for file names."""

    def __init__(self, text: str, known=None):
        self.text = text
        self.items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not self.items:
            raise UserError("--proxy is empty: name a proxy, e.g. fisher")
        twice = sorted({i for i in self.items if self.items.count(i) > 1})
        if twice:
            raise UserError(f"--proxy {text}: {', '.join(twice)} named twice; name each once")
        columns = []
        for item in self.items:
            for name in members(item) or (item,):
                if known is not None and name not in known:
                    raise UserError(f"unknown proxy {name!r}; valid names: " + ", ".join(known))
                if name not in columns:
                    columns.append(name)
        self.columns = columns
        self.ranker = self.items[0]
        self.label = "_".join(self.items).replace(":", "-")

    def scores(self, item: str, table) -> np.ndarray:
        """One item's scores for the candidates whose per-proxy columns `table` holds."""
        names = members(item)
        if names is None:
            return np.asarray(table[item], dtype=float)
        cols = [table[n] for n in names]
        return vote_scores(cols) if item == "vote" else mean_rank_scores(cols)
