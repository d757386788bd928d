"""Grading: run the exercises' tests in a copy of the repository with pytest, and say why they
failed.

One pytest subprocess runs, in the graded directory, every test that any chosen exercise selects
(the union of their -k words; starting Python, torch and the test modules costs more than most of
the tests) and writes a JUnit XML report. Each test then counts for every exercise whose selection
picks it. A failing test whose error is another exercise's stub
(`NotImplementedError: exercise M: ...`) means exercise M is still blank and blocks this one:
reported as "blocked by exercise M", not as the student's mistake nor as a crash of the grader.
"""
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

STUB_ERROR = re.compile(r"NotImplementedError: exercise (\d+)\b")


@dataclass
class Outcome:
    file: str  # "tests/test_moe.py"
    name: str  # "test_route_matches_per_token_sort_with_ties[1]"; "" for a file that did not import
    # "passed", "failed" (a failure or an error, in setup too), "skipped", or "error" (not run)
    status: str
    message: str = ""  # the line that says what went wrong
    stubs: tuple = ()  # the exercises whose stub raised in this test


@dataclass
class Result:
    number: int
    title: str
    passed: int
    total: int  # passed + failed; skipped tests count for neither
    skipped: int
    points: float
    max_points: int
    # "passed", "failed", "not attempted", "error: ...",
    # or "[failed, and ]blocked by exercise M[, ...]"
    status: str
    blocked_by: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # [{"test": ..., "message": ...}]


def error_line(message: str, text: str) -> str:
    """What went wrong in one line: pytest's message, or for a collection error the last `E   `
    line."""
    if message and message != "collection failure":
        return message.splitlines()[0][:300]
    e_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (e_lines[-1] if e_lines else message or "error")[:300]


def read_junit(xml_path: str) -> list:
    """The outcome of every test case in a pytest JUnit XML report (junit_family=xunit1: it names
    the file)."""
    outcomes = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        file, classname = case.get("file", ""), case.get("classname", "")
        problems = [c for c in case if c.tag in ("failure", "error")]
        if not classname:  # a test file that could not be collected
            text = "\n".join(p.text or "" for p in problems)
            message = error_line(problems[0].get("message", "") if problems else "", text)
            outcomes.append(Outcome(file, "", "error", f"{file}: {message}"))
            continue
        cls = classname.split(".")[len(file.split("/")):]  # test class names, if any
        name = "::".join(cls + [case.get("name", "")])
        if problems:
            text = "\n".join((p.get("message") or "") + "\n" + (p.text or "") for p in problems)
            stubs = tuple(sorted({int(n) for n in STUB_ERROR.findall(text)}))
            outcomes.append(Outcome(file, name, "failed",
                                    error_line(problems[0].get("message", ""), text), stubs))
        elif any(c.tag == "skipped" for c in case):
            outcomes.append(Outcome(file, name, "skipped"))
        else:
            outcomes.append(Outcome(file, name, "passed"))
    return outcomes


def pytest_command(exercises, report: str, basetemp: str) -> list:
    """One pytest run of every test the exercises select; its temporary files go under basetemp."""
    files = list(dict.fromkeys(path for e in exercises for path, _ in e.tests))
    words = list(dict.fromkeys(w for e in exercises for _, ws in e.tests for w in ws))
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "-o", "junit_family=xunit1",
            f"--junitxml={report}", f"--basetemp={basetemp}", *files, "-k", " or ".join(words)]


def run_tests(directory: str, exercises, timeout: float) -> tuple:
    """Run all the exercises' tests in directory: (outcomes, None), or ([], why no report came
    back)."""
    with tempfile.TemporaryDirectory(prefix="assignments-grade-") as tmp:
        report = os.path.join(tmp, "junit.xml")
        try:
            command = pytest_command(exercises, report, os.path.join(tmp, "basetemp"))
            run = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], f"the tests timed out after {timeout:g} s"
        if not os.path.exists(report):
            tail = ((run.stdout + run.stderr).strip().splitlines()[-1:]
                    or [f"exit status {run.returncode}"])
            return [], f"pytest stopped without a report: {tail[0][:300]}"
        return read_junit(report), None


def exercise_outcomes(exercise, outcomes: list) -> list:
    """The outcomes of the tests this exercise selects; a selection with no test is one "error"
    outcome (its file did not import, or the table's words pick nothing)."""
    mine = []
    for path, words in exercise.tests:
        selected = [o for o in outcomes
                    if o.name and o.file == path and exercise.selects(o.file, o.name)]
        if not selected:
            why = [o.message for o in outcomes if o.file == path and not o.name]
            selected = [Outcome(path, "", "error", why[0] if why else
                                f"{path}: -k {' or '.join(words)} selects no test")]
        mine += selected
    return mine


def classify(number: int, outcomes: list) -> tuple:
    """(status, blocked_by) of one exercise from the outcomes of its tests."""
    errors = [o for o in outcomes if o.status == "error"]
    failed = [o for o in outcomes if o.status in ("failed", "error")]
    counted = [o for o in outcomes if o.status != "skipped"]
    if errors:
        return "error: " + errors[0].message, []
    if not counted:
        return "error: every test was skipped", []
    if not failed:
        return "passed", []
    blockers = sorted({n for o in failed for n in o.stubs if n != number})
    if blockers:
        own_mistakes = any(not o.stubs for o in failed)  # failures no stub explains
        return (("failed, and " if own_mistakes else "") + "blocked by exercise "
                + ", ".join(map(str, blockers)), blockers)
    if len(failed) == len(counted) and all(o.stubs == (number,) for o in failed):
        return "not attempted", []
    return "failed", []


def exercise_result(exercise, outcomes: list) -> Result:
    status, blocked_by = classify(exercise.number, outcomes)
    passed = sum(o.status == "passed" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    total = len(outcomes) - skipped
    points = (round(exercise.points * passed / total, 2)
              if total and not status.startswith("error") else 0)
    failures = [{"test": f"{o.file}::{o.name}" if o.name else o.file, "message": o.message}
                for o in outcomes if o.status in ("failed", "error")]
    return Result(exercise.number, exercise.title, passed, total, skipped, points, exercise.points,
                  status, blocked_by, failures)


def grade(directory: str, exercises, timeout: float = 1800) -> list:
    """One Result per exercise, from one pytest run in directory."""
    outcomes, problem = run_tests(directory, exercises, timeout)
    if problem:
        outcomes = [Outcome(path, "", "error", problem) for e in exercises for path, _ in e.tests]
    return [exercise_result(e, exercise_outcomes(e, outcomes)) for e in exercises]


def number_text(x) -> str:
    return f"{x:g}"


def results_table(results: list) -> str:
    """The grade as a plain-text table, one row per exercise and a total."""
    width = max(len(r.title) for r in results)
    rows = [f"{'#':>2}  {'exercise':<{width}}  {'tests':>7}  {'points':>9}  status"]
    for r in results:
        rows.append(f"{r.number:>2}  {r.title:<{width}}  {f'{r.passed}/{r.total}':>7}  "
                    f"{number_text(r.points) + '/' + number_text(r.max_points):>9}  {r.status}")
    got, most = sum(r.points for r in results), sum(r.max_points for r in results)
    rows.append(f"{'':>2}  {'total':<{width}}  {'':>7}  "
                f"{number_text(round(got, 2)) + '/' + number_text(most):>9}")
    return "\n".join(rows)


def results_json(directory: str, results: list) -> dict:
    """The grade for a course's grading system."""
    return {"directory": os.path.abspath(directory),
            "points": round(sum(r.points for r in results), 2),
            "max_points": sum(r.max_points for r in results),
            "exercises": [asdict(r) for r in results]}
