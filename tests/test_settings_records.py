"""The settings records (engine.TrainConfig, search.SearchConfig, study.StudyConfig,
jobs.LaunchSettings and the budget and latency records they use): each default is stated
once. A script's parser reads its defaults from its record, so a flag left out means the
record's default; and no (flag, value) default is written as a literal in two places."""
import ast
import dataclasses
import os
from collections import Counter

import pytest

import fisher_rank
import main as M
import study
from blockswap import jobs
from blockswap.engine import TrainConfig
from blockswap.funcs import Budget
from blockswap.jobs import LaunchSettings
from blockswap.latency import Timing
from blockswap.search import SearchConfig
from conftest import ROOT

# (record, its parser, the required arguments, {field: flag} where they differ, fields whose
# value from_args derives from other flags: main.py's data_loc comes from --data_loc, else
# --cifar_loc/--imagenet_loc)
RECORDS = {
    "TrainConfig": (TrainConfig, M.get_args_parser, ["cifar10", "teacher"], {}, {"data_loc"}),
    "SearchConfig": (SearchConfig, fisher_rank.get_args_parser, ["cifar10"], {}, set()),
    "StudyConfig": (study.StudyConfig, study.get_args_parser, ["cifar10"], {}, set()),
    "LaunchSettings": (LaunchSettings, jobs.launcher_args, [],
                       {"threads": "threads_per_job"}, set()),
    "Timing": (Timing, fisher_rank.get_args_parser, ["cifar10"],
               {"batch": "latency_batch", "clock": "latency_clock",
                "runtime": "latency_runtime"}, set()),
    "Budget": (Budget, fisher_rank.get_args_parser, ["cifar10"], {}, set()),
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_flag_left_out_is_the_records_default(name):
    record, parser, required, flags, derived = RECORDS[name]
    parsed = vars(parser().parse_args(required))
    compared = 0
    for f in dataclasses.fields(record):
        flag = flags.get(f.name, f.name)
        if flag in parsed and f.name not in derived and f.default is not dataclasses.MISSING:
            assert parsed[flag] == f.default, (name, f.name)
            compared += 1
    # the records' flags are really compared (not a test that passes on no fields)
    assert compared >= {"TrainConfig": 40, "SearchConfig": 30, "StudyConfig": 25,
                        "LaunchSettings": 9, "Timing": 4, "Budget": 3}[name]


def test_a_record_from_no_flags_is_the_default_record():
    """from_args of the flags alone gives the record's defaults, wherever from_args does not
    fill something in (the network, the default goal, the device, the search space)."""
    args = fisher_rank.get_args_parser().parse_args(["cifar10", "--device", "cpu"])
    cfg = SearchConfig.from_args(args)
    filled = {"arch", "wrn_depth", "wrn_width", "param_goal", "device", "blocks", "launch"}
    for f in dataclasses.fields(SearchConfig):
        if f.init and f.name not in filled:
            assert getattr(cfg, f.name) == f.default, f.name
    assert (cfg.arch, cfg.wrn_depth, cfg.wrn_width, cfg.param_goal) == ("wrn", 40, 2, 800_000)
    assert cfg.spec.columns == ["fisher"] and len(cfg.blocks) == 24
    s = study.StudyConfig.from_args(study.get_args_parser().parse_args(["cifar10"]))
    assert s.replace(launch=LaunchSettings()) == study.StudyConfig()


# Where the records and the parsers that fill them are written.
SOURCES = ["main.py", "fisher_rank.py", "study.py", "blockswap/engine.py",
           "blockswap/search.py", "blockswap/jobs.py", "blockswap/loaders.py",
           "blockswap/runtime.py", "blockswap/funcs.py", "blockswap/latency.py",
           "models/archs.py"]


def literal_defaults(path):
    """[(name, value)] of every literal default in `path`: the records' fields (mapped to
    their flags' names) and add_argument(default=...) / set_defaults(name=...) calls."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in RECORDS:
            flags = RECORDS[node.name][3]
            out += [(flags.get(s.target.id, s.target.id), s.value.value) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.value, ast.Constant)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            kw = {k.arg: k.value for k in node.keywords}
            if node.func.attr == "add_argument" and isinstance(kw.get("default"), ast.Constant):
                longs = [a.value for a in node.args if isinstance(a, ast.Constant)
                         and a.value.startswith("--")]
                if longs:
                    out.append((longs[0][2:], kw["default"].value))
            if node.func.attr == "set_defaults":
                out += [(k, v.value) for k, v in kw.items() if isinstance(v, ast.Constant)]
    return out


def test_no_default_is_written_twice():
    """A value that means "nothing" (None, False, 0, "") is no stated default; every other
    (flag, value) pair is written once, in a record or in the one parser that owns the flag
    (a record reads a default another record owns, as StudyConfig.lr = TrainConfig.lr)."""
    found = Counter(pair for path in SOURCES for pair in literal_defaults(path)
                    if pair[1] not in (None, False, True, 0, ""))
    assert found[("samples", 1000)] == 1 and found[("slurm_time", 120)] == 1   # seen at all
    twice = sorted(pair for pair, n in found.items() if n > 1 and pair[0] != "dataset")
    assert not twice, f"defaults stated more than once: {twice}"


def parsers_of_every_script():
    """(name, parser) of every script's parser, each plots.py subcommand on its own."""
    import argparse
    import count_ops
    import export
    import plots
    out = []
    for name, script in (("main", M), ("fisher_rank", fisher_rank), ("study", study),
                         ("export", export), ("count_ops", count_ops), ("plots", plots)):
        p = script.get_args_parser()
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out += [(f"{name} {s}", sp) for s, sp in subs[0].choices.items()] if subs else [(name, p)]
    return out


@pytest.mark.parametrize("name, parser", parsers_of_every_script(), ids=lambda v: str(v)[:20])
def test_help_shows_every_default(name, parser):
    """--help states each flag's default (the value the record holds), or the flag's own help
    says what its default is (plots' -o: beside the input)."""
    import argparse
    text = "".join(parser.format_help().split())      # help wraps lines anywhere
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings
               and a.default is not argparse.SUPPRESS
               and f"default:{a.default}".replace(" ", "") not in text
               and "default:" not in "".join((a.help or "").split())]
    assert not missing, f"{name}: --help does not show the default of {missing}"
