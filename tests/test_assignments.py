"""The course kit (assignments/): exercise regions, hand-outs, grading, and ASSIGNMENTS.md against
the table.

The slow test checks every exercise for real: its graded tests all fail on its stub and pass on the
reference, so no exercise is graded by a test that cannot fail.
"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

from assignments.__main__ import build_parser
from assignments.exercises import BY_NUMBER, DOC_BEGIN, DOC_END, EXERCISES, exercise_sections
from assignments.grade import Outcome, classify, grade, read_junit
from assignments.handout import (MARKER, blank_exercises, blank_regions, find_regions, is_stub,
                                 read, repository_files, write_student_copy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted({path for e in EXERCISES for path in e.files})
# a hand-out holds stubs; the checks below need the reference
STUDENT_COPY = blank_exercises(ROOT, SOURCES)
needs_reference = pytest.mark.skipif(
    bool(STUDENT_COPY), reason=f"a hand-out: exercises {sorted(STUDENT_COPY)} are blank")


def functions_by_name(tree) -> dict:
    """{"Class.method" or "function": FunctionDef} of one module (top level and one class deep)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body
                          if isinstance(f, ast.FunctionDef)})
    return found


def body_after_docstring(f) -> list:
    return f.body[1:] if ast.get_docstring(f) is not None else f.body


def test_every_region_is_exactly_the_body_of_a_function_the_table_names():
    regions = set()
    for path in SOURCES:
        text = read(os.path.join(ROOT, path))
        functions = functions_by_name(ast.parse(text))
        for r in find_regions(text, path):
            inside = [n for n, f in functions.items() if f.lineno <= r.begin + 1 <= f.end_lineno]
            assert inside, f"{path}:{r.begin + 1}: exercise {r.number}'s region is in no function"
            name = max(inside, key=lambda n: functions[n].lineno)  # the innermost
            body, lines = body_after_docstring(functions[name]), text.splitlines()
            # blank lines only: a hand-out's padding after the stub
            trailing = lines[body[-1].end_lineno:r.end]
            assert (body[0].lineno == r.begin + 2 and body[-1].end_lineno <= r.end
                    and not "".join(trailing).strip()), \
                (f"{path}: exercise {r.number}'s markers must enclose all of {name}'s body "
                 "after the docstring")
            regions.add((r.number, f"{path[:-3]}.{name}"))
    # one region per function named
    assert regions == {(e.number, f) for e in EXERCISES for f in e.functions}


def test_no_other_file_has_markers():
    for path in repository_files(ROOT):
        if path.endswith(".py") and path not in SOURCES:
            text = read(os.path.join(ROOT, path))
            assert not any(MARKER.match(line) for line in text.splitlines()), \
                f"{path} has exercise markers"


@needs_reference
def test_the_hand_out_compiles_keeps_docstrings_and_line_numbers_and_blanks_only_the_bodies():
    titles = {e.number: e.title for e in EXERCISES}
    for path in SOURCES:
        text = read(os.path.join(ROOT, path))
        blank = blank_regions(text, path, titles)
        tree, blank_tree = ast.parse(text), ast.parse(blank)  # compiles
        assert len(blank.splitlines()) == len(text.splitlines())
        kept, stubbed = functions_by_name(tree), functions_by_name(blank_tree)
        assert kept.keys() == stubbed.keys()
        for name, f in kept.items():
            g = stubbed[name]
            assert ast.get_docstring(g) == ast.get_docstring(f)
            assert ast.dump(g.args) == ast.dump(f.args) and g.lineno == f.lineno
            exercise = next((e for e in EXERCISES if f"{path[:-3]}.{name}" in e.functions), None)
            if exercise:
                (stmt,) = body_after_docstring(g)
                assert isinstance(stmt, ast.Raise) and stmt.exc.func.id == "NotImplementedError"
                assert stmt.exc.args[0].value == f"exercise {exercise.number}: {exercise.title}"
                assert stmt.col_offset == body_after_docstring(f)[0].col_offset
            else:
                assert ast.dump(g) == ast.dump(f)
        # blanking a hand-out again changes nothing
        assert blank_regions(blank, path, titles) == blank
        assert {r.number for r in find_regions(blank, path) if is_stub(blank, r)} == \
            {r.number for r in find_regions(text, path)}


def test_assignments_md_is_the_table_and_its_commands_work():
    text = read(os.path.join(ROOT, "ASSIGNMENTS.md"))
    generated = text[text.index(DOC_BEGIN):text.index(DOC_END) + len(DOC_END)]
    assert generated == exercise_sections(), \
        "ASSIGNMENTS.md is out of date: run python -m assignments doc"
    headings = re.findall(r"^## (\d+)\. ", text, re.M)
    assert [int(n) for n in headings] == [e.number for e in EXERCISES]
    commands = [line.split(" # ")[0].strip()
                for line in re.findall(r"```bash\n(.*?)```", text, re.S)[0].splitlines()]
    assert [c.split()[:4] for c in commands] == [["python", "-m", "assignments", "student"],
                                                ["python", "-m", "pytest", "-q"],
                                                ["python", "-m", "assignments", "grade"]]
    build_parser().parse_args(commands[0].split()[3:])
    build_parser().parse_args(commands[2].split()[3:])
    assert commands[1] in [c for e in EXERCISES for c in e.commands()]


def test_keywords_select_by_test_name_only():
    """The grader picks an exercise's tests by name (Exercise.selects); pytest -k also
    matches file, class and marker names. So no word may occur in those, and every word
    must pick some test function."""
    for e in EXERCISES:
        for path, words in e.tests:
            source = read(os.path.join(ROOT, path))
            names = re.findall(r"^(?:def|class) (Test\w*|test\w*)", source, re.M)
            markers = (set(re.findall(r"pytest\.mark\.(\w+)", source))
                       | {"slow", "parametrize", "skipif", "xfail"})
            for w in words:
                assert re.fullmatch(r"\w+", w), \
                    f"exercise {e.number}: -k word {w!r} must be a plain word"
                assert not any(w.lower() in other.lower()
                               for other in path.split("/") + sorted(markers))
                assert any(w.lower() in n.lower() for n in names), \
                    f"exercise {e.number}: {w!r} selects no test in {path}"


def test_failures_are_attributed_to_the_stub_that_raised():
    own = Outcome("t.py", "a", "failed", "NotImplementedError: exercise 4: x", (4,))
    other = Outcome("t.py", "b", "failed", "NotImplementedError: exercise 3: x", (3,))
    wrong = Outcome("t.py", "c", "failed", "assert 1 == 2")
    ok = Outcome("t.py", "d", "passed")
    assert classify(4, [ok, ok]) == ("passed", [])
    assert classify(4, [own, own]) == ("not attempted", [])
    assert classify(4, [own, ok]) == ("failed", [])
    assert classify(4, [own, wrong]) == ("failed", [])
    assert classify(4, [own, other, ok]) == ("blocked by exercise 3", [3])
    assert classify(4, [wrong, other]) == ("failed, and blocked by exercise 3", [3])
    assert classify(4, [Outcome("t.py", "", "error", "t.py: SyntaxError: invalid syntax"),
                        ok])[0].startswith("error")


def test_junit_report_is_read_with_stub_errors_and_collection_errors(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="" name="tests.test_x" file="tests/test_x.py">'
        '<error message="collection failure">'
        'tests/test_x.py:1: in &lt;module&gt;\nE   SyntaxError: invalid syntax</error></testcase>'
        '<testcase classname="tests.test_y" name="test_a[1]" file="tests/test_y.py">'
        '<failure message="NotImplementedError: exercise 3: The sorted, grouped dispatch">'
        'E   NotImplementedError: exercise 3: The sorted</failure></testcase>'
        '<testcase classname="tests.test_y.TestZ" name="test_b" file="tests/test_y.py"/>'
        '<testcase classname="tests.test_y" name="test_c" file="tests/test_y.py">'
        '<skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    x, a, b, c = read_junit(str(report))
    assert (x.file, x.name, x.status, x.message) == ("tests/test_x.py", "", "error",
                                                     "tests/test_x.py: SyntaxError: invalid syntax")
    assert (a.name, a.status, a.stubs) == ("test_a[1]", "failed", (3,))
    assert (b.name, b.status) == ("TestZ::test_b", "passed") and c.status == "skipped"


def run_kit(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "assignments", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    no_such_exercise = max(e.number for e in EXERCISES) + 1
    for args in (["student", str(tmp_path / "full")],
                 ["student", str(tmp_path / "new"), "--only", f"2,{no_such_exercise}"],
                 ["grade", str(tmp_path / "missing")], ["grade", str(tmp_path / "full")]):
        run = run_kit(*args)
        assert run.returncode == 2 and run.stdout == "", args
        assert run.stderr.startswith("assignments: error: ") and run.stderr.count("\n") == 1, \
            run.stderr
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "full") == ["x"]


@needs_reference
def test_one_exercise_end_to_end(tmp_path):
    """Hand out exercise 10 alone: its tests fail there on its stub and pass on the reference."""
    out = tmp_path / "handout"
    out.mkdir()  # an empty directory is fine
    run = run_kit("student", str(out), "--only", "10")
    assert run.returncode == 0, run.stderr
    assert not (out / ".git").exists() and not (out / "runs").exists()
    assert 'raise NotImplementedError("exercise 10: ' in read(str(out / "trainer.py"))
    for path in repository_files(ROOT):
        if path != "trainer.py":
            with open(os.path.join(ROOT, path), "rb") as a, open(out / path, "rb") as b:
                assert a.read() == b.read(), path
    assert blank_exercises(str(out), SOURCES) == {10}

    run = run_kit("grade", str(out), "--only", "10", "--json", str(tmp_path / "grade.json"))
    assert run.returncode == 0, run.stderr
    (result,) = json.loads((tmp_path / "grade.json").read_text())["exercises"]
    assert (result["number"], result["status"], result["passed"], result["points"]) == \
        (10, "not attempted", 0, 0)
    assert result["total"] >= 1 and re.search(r"^10 .* 0/5 +not attempted$", run.stdout, re.M), \
        run.stdout

    (reference,) = grade(ROOT, [BY_NUMBER[10]])
    assert (reference.status, reference.points) == ("passed", 5)


@pytest.mark.slow
@needs_reference
def test_every_exercise_fails_on_its_stub_and_passes_on_the_reference(tmp_path):
    """Every graded test of every exercise fails when that exercise alone is blank, and passes on
    the reference.

    To save pytest runs, first grade a copy with all exercises blank. A test that raised exercise
    N's stub and no other there ran no other exercise's code before (it would have raised), so it
    takes the same path, and fails, when N alone is blank. Only the exercises with tests blocked by
    another stub get their own copy.
    """
    reference = grade(ROOT, EXERCISES)
    assert [(r.number, r.status, r.points) for r in reference] == \
        [(e.number, "passed", e.points) for e in EXERCISES]

    write_student_copy(ROOT, str(tmp_path / "all"), EXERCISES)
    own_copy = []
    for e, r in zip(EXERCISES, grade(str(tmp_path / "all"), EXERCISES)):
        assert r.passed == 0 and r.total > 0, \
            f"exercise {e.number}: {r.failures} pass with every exercise blank"
        assert r.status == "not attempted" or r.blocked_by, (e.number, r.status, r.failures)
        if r.status != "not attempted":
            own_copy.append(e)
    assert own_copy, "expected some exercise to be blocked by another one when all are blank"

    for e in own_copy:
        write_student_copy(ROOT, str(tmp_path / str(e.number)), [e])
        (r,) = grade(str(tmp_path / str(e.number)), [e])
        assert (r.status, r.passed) == ("not attempted", 0), (e.number, r.status, r.failures)
