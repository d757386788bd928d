"""The README's promises: its two commands, and every file:line pointer to a paper equation."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)[0].strip().splitlines()
    main, tests = (c.split("#")[0].strip() for c in commands[:2])
    assert main == "python -m pip install -r requirements.txt && python pipeline.py"
    assert tests == "python -m pip install -r requirements.txt && python -m pytest -q"
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    # .ci/run runs exactly the README's test command (then `|| exit $?`: set -e does not stop on
    # && lists)
    assert any(line.split(" || ")[0] == tests for line in ci.splitlines())


def test_every_file_line_pointer_names_the_symbol_defined_there():
    pointers = re.findall(r"\[`([\w/]+\.py):(\d+)`\]\(([\w/]+\.py)#L(\d+)\) `([\w.]+)`", README)
    assert len(pointers) >= 10
    for path, line, link_path, link_line, symbol in pointers:
        assert (link_path, link_line) == (path, line), \
            f"README shows {path}:{line} but links {link_path}#L{link_line}"
        text = open(os.path.join(ROOT, path)).read().splitlines()[int(line) - 1]
        name = symbol.split(".")[-1]
        assert re.search(rf"\b(def|class) {name}\b", text), \
            f"README points {symbol} at {path}:{line}: {text!r}"
