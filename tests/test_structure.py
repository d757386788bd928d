"""The shape of the code a student reads: the method apart from the machinery, imports flowing one
way and sitting at the top of their files, few files at the top level."""
import ast
import glob
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHOD = {"model", "moe", "losses", "trainer", "fusion"}  # what a student reads to learn H3Fusion
# the commands; they may use anything
SCRIPTS = {"train_expert", "fuse", "evaluate", "pipeline", "generate"}
MAX_TOP_LEVEL = 10
MAX_WIDTH = 100  # characters per line, as ruff.toml's line-length


def project_modules() -> dict:
    """{dotted module name: path} of every module of the project's packages (not tests/ or
    bench/)."""
    files = glob.glob(os.path.join(ROOT, "*.py"))
    for package in ("data", "evaluation", "engineering", "assignments"):
        files += glob.glob(os.path.join(ROOT, package, "*.py"))
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
        return found | {f"{node.module}.{a.name}" for a in node.names
                        if f"{node.module}.{a.name}" in modules}
    return set()


def import_graph() -> tuple:
    """({module: the project modules it imports at its top level}, [imports found inside
    functions])."""
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
    return graph, inside_functions


def reachable(graph: dict, start: str) -> set:
    seen, stack = set(), [start]
    while stack:
        for dep in graph.get(stack.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def is_data(name: str) -> bool:
    return name == "data" or name.startswith("data.")


def test_the_method_imports_only_the_method_and_data():
    """model.py, moe.py, losses.py, trainer.py and fusion.py import from the project only each
    other and data/, and nothing they reach, however indirectly, is machinery (engineering/),
    evaluation or a command."""
    graph, _ = import_graph()
    assert graph["moe"] == set(), "moe.py must import nothing from the project"
    assert graph["losses"] <= {"moe", "data.format"}, f"losses.py imports {sorted(graph['losses'])}"
    assert len(graph["model"]) <= 2, f"model.py imports {sorted(graph['model'])}"
    for name in METHOD:
        outside = {m for m in graph[name] if m not in METHOD and not is_data(m)}
        assert not outside, (f"{name}.py imports {sorted(outside)}: "
                             "the method imports only the method and data/")
        far = {m for m in reachable(graph, name) if m not in METHOD and not is_data(m)}
        assert not far, f"{name}.py reaches {sorted(far)} through its imports"


def test_the_machinery_and_data_never_import_a_command():
    graph, _ = import_graph()
    for name, deps in graph.items():
        if name.startswith(("engineering", "evaluation", "data")):
            assert not deps & SCRIPTS, f"{name} imports the command(s) {sorted(deps & SCRIPTS)}"
        if is_data(name):
            assert not deps & (METHOD - {"moe"}), \
                f"{name} imports the model or the stages: {sorted(deps)}"


def test_imports_sit_at_the_top_and_make_no_cycle():
    graph, inside_functions = import_graph()
    assert not inside_functions, f"project imports inside functions: {inside_functions}"
    cycles = [name for name in graph if name in reachable(graph, name)]
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_import_finder_sees_top_level_and_function_level_imports():
    """The finder itself, on planted code: top-level imports both ways, and an import inside a
    function."""
    modules = {"a": "", "b": ""}
    tree_a = ast.parse("import b\ndef f():\n    import b\n")
    tree_b = ast.parse("from a import x\n")
    assert set().union(*[imported_project_modules(n, modules) for n in tree_a.body]) == {"b"}
    assert set().union(*[imported_project_modules(n, modules) for n in tree_b.body]) == {"a"}
    inner = [n for n in ast.walk(tree_a.body[1]) if imported_project_modules(n, modules)]
    assert len(inner) == 1 and inner[0].lineno == 3
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def test_the_top_level_holds_the_method_and_its_commands():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} .py files at the top level: {top}"
    assert {f"{name}.py" for name in METHOD | SCRIPTS} <= set(top), top


def tracked_python_files() -> list:
    """The repository's .py files (git's list when there is a git, else a walk)."""
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        paths = out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        paths = []
    if not paths:
        paths = [os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)]
    return paths


def test_lines_are_a_screen_wide():
    """No line of Python is wider than 100 characters (.ci/run checks the same with ruff; this is
    the rule without the linter, counting characters, not bytes)."""
    files = tracked_python_files()
    assert len(files) > 50 and "model.py" in files
    wide = [f"{path}:{n} ({len(line)})" for path in files
            for n, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8")
                                     .read().splitlines(), start=1)
            if len(line) > MAX_WIDTH]
    assert not wide, f"{len(wide)} lines wider than {MAX_WIDTH}: {wide[:20]}"
