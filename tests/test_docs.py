"""Every --flag written in the docs exists. A flag on a command line (`python main.py ... --x`,
in a fenced block or in backticks) must be an option of that script's parser (of its
sub-command for plots.py); any other --flag on a page must be an option of some script, so a
renamed flag cannot linger in the docs."""
import argparse
import ast
import functools
import glob
import importlib
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in
                               glob.glob(os.path.join(ROOT, "docs", "*.md"))) + ["bench/README.md"]
# Flags of other programs that the docs write beside ours (torchrun's launcher options).
FOREIGN = {"--nproc_per_node", "--standalone", "--nnodes", "--rdzv_endpoint"}
# Scripts and pages the docs may name before they land in this tree (another branch writes them).
PLANNED = {"export.py", "bench/bench_export.py"}
PLANNED_PAGES = {"docs/export.md", "docs/scale.md"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SCRIPT = re.compile(r"(?:\./)?((?:bench/)?\w+\.py)")
LAUNCHERS = {"python", "python3", "torchrun"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


# --------------------------------------------------------------------------------------------
# Reading the pages
# --------------------------------------------------------------------------------------------

def code_pieces(text: str):
    """Each piece of code of a markdown page: a line of a fenced block (with its `\\`
    continuations joined and its `# comment` cut) or an inline code span."""
    pieces = []
    for body in FENCE.findall(text):
        for line in re.sub(r"\\\n", " ", body).splitlines():
            pieces.append(re.sub(r"(^|\s)#.*", "", line))
    prose = FENCE.sub("", text)
    pieces += [span.replace("\n", " ") for span in INLINE.findall(prose)]
    return pieces


def commands(piece: str):
    """(script, sub-command or None, [--flags]) of each script invocation in a piece of code:
    the flags after the script's name, up to the end of its shell command."""
    found = []
    for part in re.split(r"&&|;|\s\|\s", piece):
        tokens = part.split()
        for i, token in enumerate(tokens):
            m = SCRIPT.fullmatch(token)
            rest = tokens[i + 1:]
            # a command, not a file named in passing: run by python or torchrun, or given flags
            if m and (LAUNCHERS.intersection(tokens[:i]) or FLAG.search(" ".join(rest))):
                sub = next((t for t in rest if not t.startswith("-")), None)
                found.append((m.group(1), sub, FLAG.findall(" ".join(rest))))
                break
    return found


# --------------------------------------------------------------------------------------------
# The scripts' parsers
# --------------------------------------------------------------------------------------------

def parser_options(parser: argparse.ArgumentParser) -> dict:
    """{None: the parser's option strings, sub-command: its sub-parser's option strings}."""
    table = {None: set()}
    for action in parser._actions:
        table[None].update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                table[name] = parser_options(sub)[None]
    return table


def allowed(table: dict, sub) -> set:
    """The options a command line may use: the top level's and its sub-command's (all
    sub-commands' when the line names none, e.g. `plots.py {search,training} FILE`)."""
    if sub in table:
        return table[None] | table[sub]
    return set().union(*table.values())


def literal_options(tree: ast.AST) -> set:
    """Option strings of every add_argument("--x", ...) call written in a module."""
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            and arg.value.startswith("-")}


def load_script(rel: str):
    if "/" not in rel:
        return importlib.import_module(rel[:-3])
    spec = importlib.util.spec_from_file_location("docs_" + rel[:-3].replace("/", "_"),
                                                  os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def script_options(rel: str):
    """The option table of a script of this tree (None if there is no such file): from its
    get_args_parser(), or for a bench script without one, from its add_argument calls."""
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):
        return None
    tree = ast.parse(open(path).read())
    if "get_args_parser" in open(path).read():   # its own, or the library's (count_ops.py)
        return parser_options(load_script(rel).get_args_parser())
    return {None: literal_options(tree)}


def scripts_of_tree():
    """The top-level scripts (a module with get_args_parser) and every bench/ script."""
    top = [os.path.basename(p) for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))
           if "get_args_parser" in open(p).read()]
    return top + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "*.py")))


@functools.lru_cache(maxsize=None)
def tree_tables():
    return {rel: script_options(rel) for rel in scripts_of_tree()}


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------

def check_text(text: str, tables: dict, planned=PLANNED) -> list:
    """Every problem of a page: a flag its script's parser lacks, a script that is not in the
    tree (unless planned), a --flag that no script has."""
    problems = []
    for piece in code_pieces(text):
        for script, sub, flags in commands(piece):
            if script not in tables:
                if script not in planned:
                    problems.append(f"{script}: no such script (in `{piece.strip()}`)")
                continue
            ok = allowed(tables[script], sub)
            problems += [f"{script}: no option {f} (in `{piece.strip()}`)"
                         for f in flags if f not in ok]
    known = set(FOREIGN).union(*(set().union(*t.values()) for t in tables.values()))
    problems += [f"{f}: no script has this option" for f in sorted(set(FLAG.findall(text)) - known)]
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_of_the_docs_exists(page):
    path = os.path.join(ROOT, page)
    if not os.path.isfile(path):
        pytest.skip(f"{page} is not in this tree")
    assert check_text(open(path).read(), tree_tables()) == []


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: str, text: str = None) -> list:
    """Relative links of a page whose file (or #heading in it) does not exist."""
    text = FENCE.sub("", text if text is not None else open(os.path.join(ROOT, page)).read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue   # a web address
        file, _, frag = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if path in PLANNED_PAGES:
            continue
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            broken.append(target)
        elif frag and frag not in {anchor(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub(
                "", open(full).read()), re.M)}:
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    if not os.path.isfile(os.path.join(ROOT, page)):
        pytest.skip(f"{page} is not in this tree")
    assert broken_links(page) == []


def test_readme_commands_are_found():
    """The checker reads the README's command lines (a reader that finds none passes anything)."""
    found = [c for piece in code_pieces(open(os.path.join(ROOT, "README.md")).read())
             for c in commands(piece)]
    scripts = {script for script, _, _ in found}
    assert {"main.py", "fisher_rank.py", "plots.py"} <= scripts
    assert ("fisher_rank.py", "cifar10", ["--data_loc", "--param_goal"]) in found
    student = [c for c in found if c[0] == "main.py" and "--from_genotype" in c[2]]
    assert student and "--cifar_loc" in student[0][2]   # the flag after a `\` continuation


# --------------------------------------------------------------------------------------------
# The checker itself, on made-up pages and parsers
# --------------------------------------------------------------------------------------------

def made_up_tables():
    train = argparse.ArgumentParser()
    train.add_argument("--epochs")
    train.add_argument("--data_loc")
    plot = argparse.ArgumentParser()
    sub = plot.add_subparsers(dest="what")
    sub.add_parser("search").add_argument("--score")
    sub.add_parser("training").add_argument("-o", "--out")
    return {"train.py": parser_options(train), "plot.py": parser_options(plot)}


def test_checker_passes_a_correct_page():
    page = ("Train:\n\n```\npython train.py --epochs 3 \\\n    --data_loc=<path>   # 3 epochs\n"
            "torchrun --nproc_per_node 2 train.py --epochs 1\n```\n\n"
            "Then `python plot.py search r.csv --score fisher`, or `--out` with any sub-command.\n")
    assert check_text(page, made_up_tables()) == []


def test_checker_finds_a_misspelt_flag():
    page = "```\npython train.py --epochs 3 \\\n    --data-loc x\n```\n"
    problems = check_text(page, made_up_tables())
    assert len(problems) == 2 and "train.py: no option --data-loc" in problems[0]
    assert problems[1] == "--data-loc: no script has this option"


def test_checker_finds_a_flag_of_another_script_or_sub_command():
    page = "Run `train.py --score x` and `python plot.py training log.csv --score y`.\n"
    problems = check_text(page, made_up_tables())
    assert [p.split(" (")[0] for p in problems] == ["train.py: no option --score",
                                                     "plot.py: no option --score"]


def test_checker_finds_a_prose_flag_and_an_unknown_script():
    page = "The `--epoch` flag; `python trian.py --epochs 2`; `python export.py x.t7 -o y`.\n"
    problems = check_text(page, made_up_tables(), planned={"export.py"})
    assert problems[0].startswith("trian.py: no such script")
    assert problems[1:] == ["--epoch: no script has this option"]


def test_link_checker_finds_a_moved_section():
    assert anchor("Precision, compilation and the device check") == \
        "precision-compilation-and-the-device-check"
    page = ("[ok](docs/search.md#trained-re-rank) [gone](docs/search.md#no-such-heading) "
            "[moved](docs/nowhere.md) [planned](docs/export.md) [web](https://arxiv.org/abs/1)")
    assert broken_links("README.md", page) == ["docs/search.md#no-such-heading", "docs/nowhere.md"]
