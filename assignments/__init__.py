"""The course kit: hand out exercises and grade them (see ASSIGNMENTS.md).

    python -m assignments student OUT [--only 2,4,5]
        a copy of the repository with those bodies blanked
    python -m assignments grade [DIR] [--only ...] [--json F]
        run each exercise's tests in DIR, print the points
    python -m assignments doc
        rewrite ASSIGNMENTS.md's sections from the table

exercises.py holds the one table of exercises, handout.py the source regions and the hand-out,
grade.py the grader. Plain standard library: it imports neither torch nor pytest (the graded tests
run in subprocesses).
"""
