"""Command line of the course kit: `python -m assignments student|grade|doc ...`
(see assignments/__init__.py).

Bad input (an existing output directory, an unknown exercise, a directory without the tests) is one
line `assignments: error: ...` on stderr and exit status 2. A student who fails tests is not an
error: grade exits 0.
"""
import argparse
import json
import os
import sys

from assignments.exercises import BY_NUMBER, DOC_BEGIN, DOC_END, EXERCISES, exercise_sections
from assignments.grade import grade as grade_directory, results_json, results_table
from assignments.handout import HandoutError, read, write_student_copy
from engineering.fileio import write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the reference repository


class UsageError(Exception):
    pass


def parse_only(text) -> list:
    """"2,4,5" -> [the Exercise objects 2, 4, 5]; None -> all of them."""
    if text is None:
        return list(EXERCISES)
    numbers = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) not in BY_NUMBER:
            raise UsageError(f"--only {text}: {part.strip()!r} is not an exercise number "
                             f"(1 to {len(EXERCISES)}, separated by commas)")
        numbers.append(int(part))
    return [BY_NUMBER[n] for n in sorted(set(numbers))]


def student(args):
    exercises = parse_only(args.only)
    files = write_student_copy(ROOT, args.out, exercises)
    print(f"{args.out}: {len(files)} files, "
          f"exercises {', '.join(str(e.number) for e in exercises)} blanked")


def grade(args):
    exercises = parse_only(args.only)
    if not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir}: no such directory")
    for e in exercises:
        for path, _ in e.tests:
            if not os.path.isfile(os.path.join(args.dir, path)):
                raise UsageError(f"{os.path.join(args.dir, path)} not found; "
                                 f"is {args.dir} a copy of this repository?")
    numbers = ", ".join(str(e.number) for e in exercises)
    print(f"assignments: running the tests of exercises {numbers} in {args.dir} ...",
          file=sys.stderr, flush=True)
    results = grade_directory(args.dir, exercises, timeout=args.timeout)
    print(results_table(results))
    if args.json:
        write_text(args.json,
                   json.dumps(results_json(args.dir, results), indent=2, ensure_ascii=False) + "\n")


def doc(args):
    path = os.path.join(ROOT, "ASSIGNMENTS.md")
    text = read(path)
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1:
        raise UsageError(f"{path}: expected one line {DOC_BEGIN!r} and one {DOC_END!r}")
    head, rest = text.split(DOC_BEGIN)
    new = head + exercise_sections() + rest.split(DOC_END, 1)[1]
    if new == text:
        print(f"{path}: up to date")
    else:
        write_text(path, new)
        print(f"{path}: exercise sections rewritten from assignments/exercises.py")


def write_text(path: str, text: str):
    """engineering/fileio.py's write_atomic (a reader never sees half a file); a failure is a usage
    error naming the file."""
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e


def build_parser():
    parser = argparse.ArgumentParser(
        prog="assignments", description="Hand out and grade the exercises of ASSIGNMENTS.md.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("student", help="write a copy of the repository "
                                       "with exercise bodies blanked")
    p.add_argument("out", metavar="OUT", help="a new (or empty) directory")
    p.add_argument("--only", metavar="N,M,...", help="blank only these exercises (default: all)")
    p.set_defaults(run=student)
    p = sub.add_parser("grade", help="run each exercise's tests in DIR and print the points")
    p.add_argument("dir", metavar="DIR", nargs="?", default=".",
                   help="a (student's) copy of the repository (default: .)")
    p.add_argument("--only", metavar="N,M,...", help="grade only these exercises (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the grade as JSON to FILE")
    p.add_argument("--timeout", type=float, default=1800, metavar="S",
                   help="limit on the test run (default: 1800 s)")
    p.set_defaults(run=grade)
    p = sub.add_parser("doc", help="rewrite ASSIGNMENTS.md's exercise sections "
                                   "from assignments/exercises.py")
    p.set_defaults(run=doc)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, HandoutError) as e:
        print(f"assignments: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
