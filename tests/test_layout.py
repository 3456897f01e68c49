"""The shape the project promises a reader: the top level is the method and its tools, the plumbing one folder
(plumbing/) that imports nothing of the method; six concept files of at most 2,000 lines together, short functions,
train.py a leaf that no other entry point imports."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = ["fsm.py", "codebook.py", "model.py", "train.py", "steer.py", "analyze.py"]
OWN = sorted(set(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "plumbing", "*.py"))
                 + glob.glob(os.path.join(ROOT, "scripts", "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py"))
                 + glob.glob(os.path.join(ROOT, "config", "*.py"))))
METHOD = ["fsm.py", "codebook.py", "model.py", "train.py", "steer.py", "analyze.py", "evaluate.py", "pythia.py",
          "sample.py", "sae.py", "topics.py", "report.py", "bench.py", "stories.py"]


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_concept_files_are_short():
    """Each concept file reads in one sitting (at most 450 lines); the six together at most 2,000 lines."""
    n = {name: len(lines(os.path.join(ROOT, name))) for name in CONCEPTS}
    assert sum(n.values()) <= 2000 and max(n.values()) <= 450, n


def test_top_level_is_the_method():
    """The top level holds the method and its tools, nothing else in Python: the plumbing lives in plumbing/, the
    workshop (notebook, checks, solutions) in workshop/."""
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    extra = [name for name in top if name not in METHOD]
    assert not extra, extra
    assert not [m for m in METHOD if not os.path.isfile(os.path.join(ROOT, m))]


def test_no_function_over_80_lines():
    long = []
    for path in OWN:
        for node in ast.walk(ast.parse("\n".join(lines(path)))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{os.path.relpath(path, ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_entry_point_imports_train():
    importers = []
    for path in OWN:
        for node in ast.walk(ast.parse("\n".join(lines(path)))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "train" in names:
                importers.append(os.path.relpath(path, ROOT))
    assert not importers, importers


PLUMBING = ["configuration.py", "entry.py", "files.py", "rundir.py", "ddp.py", "tokens.py", "progress.py", "memory.py"]


def module_files():
    """{module name as imported: path}: the top-level modules and plumbing.X."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    found.update({"plumbing." + os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "plumbing", "*.py"))
                  if not p.endswith("__init__.py")})
    return found


def own_imports(path):
    """The project's modules that `path` imports, at its top or inside a function (`from plumbing import x` and
    `from plumbing.x import y` both count as plumbing.x)."""
    mods = set(module_files())
    found = set()
    for node in ast.walk(ast.parse("\n".join(lines(path)))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        if isinstance(node, ast.ImportFrom) and node.module == "plumbing":
            names = [f"plumbing.{a.name}" for a in node.names]
        found |= {n if n.startswith("plumbing.") else n.split(".")[0] for n in names} & mods
    return found


def test_import_graph_has_no_cycle_and_plumbing_imports_only_plumbing():
    """The concept files import the plumbing, never the other way round; no module imports itself back through
    others (pythia.py, the mapper GPT.from_pythia calls, imports no model); utils.py, the old grab-bag, is gone."""
    graph = {name: own_imports(p) for name, p in module_files().items()}
    assert "utils" not in graph
    plumbing = {"plumbing." + p[:-3] for p in PLUMBING}
    assert plumbing <= set(graph), plumbing - set(graph)
    for name in plumbing:
        assert graph[name] <= plumbing, (name, graph[name] - plumbing)
    assert graph["pythia"] <= plumbing, graph["pythia"]

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen
    cycles = sorted(name for name in graph if name in reach(name))
    assert not cycles, cycles
