"""The project's shape (docs/DESIGN.md): the modules import each other without a circle, and
no function takes more than 7 parameters or runs longer than 60 lines unless its docstring
says why ("Why wide:" / "Why long:"). Read with ast, so nothing is imported or run."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PARAMS, MAX_LINES = 7, 60


def project_modules(root=ROOT):
    """{module name: path} of the top-level scripts, the blockswap package's modules
    ('blockswap.search', ...) and the models package."""
    mods = {f[:-3]: os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py")}
    for pkg in ("models", "blockswap"):
        if not os.path.isdir(os.path.join(root, pkg)):
            continue
        for f in os.listdir(os.path.join(root, pkg)):
            if f.endswith(".py"):
                name = pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                mods[name] = os.path.join(root, pkg, f)
    return mods


def imports_of(path, mods):
    """The project modules a file imports, at any depth (lazy imports in functions too)."""
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from blockswap import engine` imports the module blockswap.engine
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in mods] or [node.module]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name:
                deps.add(name)
    return deps


def import_graph(root=ROOT):
    mods = project_modules(root)
    return {m: sorted(imports_of(p, mods) - {m}) for m, p in mods.items()}


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, []):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d, path + [d])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def functions(root=ROOT):
    """(qualified name, parameter count, body lines, docstring) of every function."""
    out = []
    for mod, path in project_modules(root).items():
        for node in ast.walk(ast.parse(open(path).read())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            n = len(params) + bool(a.vararg) + bool(a.kwarg)
            n -= bool(params) and params[0].arg in ("self", "cls")
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc and len(node.body) > 1 else node.body
            out.append((f"{mod}.{node.name}", n, node.end_lineno - body[0].lineno + 1, doc))
    return out


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert {"main", "fisher_rank", "funcs", "count_ops", "models"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_imports_are_read_at_any_depth(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "blocks.py").write_text("import os\n")
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n    import models.blocks\n")
    (tmp_path / "b.py").write_text("from a import f\n")
    graph = import_graph(str(tmp_path))
    assert graph["a"] == ["b", "models.blocks"] and graph["b"] == ["a"]
    assert find_cycle(graph) == ["a", "b", "a"]


@pytest.mark.parametrize("limit, what, reason", [(MAX_PARAMS, 1, "Why wide:"),
                                                 (MAX_LINES, 2, "Why long:")])
def test_functions_are_narrow_and_short_or_say_why(limit, what, reason):
    over = [f"{f[0]} ({f[what]})" for f in functions() if f[what] > limit and reason not in f[3]]
    assert not over, f"over {limit} without '{reason}' in the docstring: {', '.join(over)}"


# What sits at the root (docs/layout.md): the command-line programs and the design card's
# names (funcs.py, count_ops.py, engine.py re-export the library for users' scripts). Each
# calls the library; none imports another, and the library imports none of them.
SCRIPTS = ("main", "fisher_rank", "study", "export", "plots", "count_ops", "funcs", "engine")
MAX_LAYERS, MAX_MODULE_LINES = 6, 650


def collapsed(graph):
    """The graph with the models package as one node ('models')."""
    name = lambda m: "models" if m.startswith("models") else m   # noqa: E731
    out = {}
    for m, deps in graph.items():
        out.setdefault(name(m), set()).update(name(d) for d in deps)
    return {m: sorted(d - {m}) for m, d in out.items()}


def layers(graph):
    """{module: layer}: 1 for a module that imports no project module, else one more than the
    highest layer it imports (the longest import chain below it, counted in modules)."""
    memo = {}

    def layer(m):
        if m not in memo:
            memo[m] = 1 + max((layer(d) for d in graph.get(m, [])), default=0)
        return memo[m]
    return {m: layer(m) for m in graph}


def test_no_script_imports_a_script():
    graph = import_graph()
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if d in SCRIPTS]
    assert not bad, f"a script is imported: {', '.join(bad)} (move what is shared to a library)"


def test_the_root_holds_only_the_scripts_and_the_library_imports_none():
    mods = project_modules()
    root = sorted(m for m in mods if "." not in m and m not in ("models", "blockswap"))
    assert root == sorted(SCRIPTS), root
    graph = import_graph()
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith(("blockswap", "models"))
           for d in deps if not d.startswith(("blockswap", "models"))]
    assert not bad, f"the library imports a root script: {', '.join(bad)}"


def test_the_import_graph_has_at_most_six_layers():
    depth = layers(collapsed(import_graph()))
    assert depth["models"] == 1 and max(depth.values()) <= MAX_LAYERS, sorted(
        depth.items(), key=lambda kv: -kv[1])


def test_layer_counter_and_script_rule_catch_what_they_should():
    g = {"a": ["b"], "b": ["c"], "c": ["models.blocks"], "models.blocks": [], "models.archs": ["models.blocks"]}
    assert layers(collapsed(g)) == {"a": 4, "b": 3, "c": 2, "models": 1}
    assert collapsed({"study": ["main"]}) == {"study": ["main"]}   # what the script rule reads


def test_no_module_is_over_650_lines():
    long = {m: n for m, p in project_modules().items()
            if (n := sum(1 for _ in open(p))) > MAX_MODULE_LINES}
    assert not long, long
