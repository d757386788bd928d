"""The shape of the code a student reads: imports flow one way, and every project import is at the top of its file."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules() -> dict:
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py")) \
        + glob.glob(os.path.join(ROOT, "evaluation", "*.py")) + glob.glob(os.path.join(ROOT, "engineering", "*.py"))
    names = {}
    for path in files:
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        names[name] = path
    return names


def imported_project_modules(node, modules) -> set:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found = {node.module} if node.module in modules else set()
        return found | {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return set()


def test_imports_flow_one_way_and_sit_at_the_top():
    modules = project_modules()
    graph, inside_functions = {}, []
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        graph[name] = set().union(*[imported_project_modules(n, modules) for n in tree.body])
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if imported_project_modules(inner, modules):
                        inside_functions.append(f"{name}.{node.name} (line {inner.lineno})")
    assert not inside_functions, f"project imports inside functions: {inside_functions}"
    assert graph["moe"] == set(), "moe.py must import nothing from the project"
    training_side = graph["model"] & {"cli", "data.format", "data.records", "trainer"}
    assert not training_side, f"model.py (the single-file LLaMA) imports the training side: {sorted(training_side)}"
    assert not any(dep in {"model", "trainer", "evaluate", "upcycle", "fuse", "engineering.rundir", "engineering.distributed"}
                   for n, deps in graph.items()
                   if n.startswith("data") for dep in deps), "data/ must not import the model or the stages"

    def cycle_from(start):  # depth-first search for a path that returns to `start`
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in path:
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, f"import cycles: {cycles}"


def test_the_import_finder_sees_top_level_and_function_level_imports():
    """The finder itself, on planted code: top-level imports both ways, and an import inside a function."""
    modules = {"a": "", "b": ""}
    tree_a = ast.parse("import b\ndef f():\n    import b\n")
    tree_b = ast.parse("from a import x\n")
    assert set().union(*[imported_project_modules(n, modules) for n in tree_a.body]) == {"b"}
    assert set().union(*[imported_project_modules(n, modules) for n in tree_b.body]) == {"a"}
    inner = [n for n in ast.walk(tree_a.body[1]) if imported_project_modules(n, modules)]
    assert len(inner) == 1 and inner[0].lineno == 3


CORE = ("model.py", "moe.py", "losses.py", "trainer.py", "train_expert.py", "fuse.py")
DATA_TABLES = {"data/toy_tables.py"}  # word lists and templates, no logic


def test_the_core_a_student_reads_stays_short():
    """The six files that hold the method (issue 13): at most 1,700 lines together, and no file of the project over
    600 lines except pure data tables. Support code (distributed.py, runstate.py, cli.py, fileio.py, upcycle.py)
    lives in files of its own."""
    lines = {path: len(open(path).read().splitlines()) for path in project_modules().values()}
    core = sum(lines[os.path.join(ROOT, name)] for name in CORE)
    assert core <= 1700, f"core files: {core} lines (goal <= 1,700)"
    long = {os.path.relpath(p, ROOT): n for p, n in lines.items() if n > 600}
    assert set(long) <= DATA_TABLES, f"files over 600 lines: {long}"
