"""Exercise regions in the source, and the student hand-out: a copy of the repository with chosen
bodies blanked.

A region is the body of one function (after its docstring) between two comment lines at the body's
indentation:

    # --- exercise N: begin ---
    ... the reference solution ...
    # --- exercise N: end ---

An exercise may have several regions (one per function it covers). In the hand-out the lines
between the markers become one `raise NotImplementedError("exercise N: <title>")` followed by blank
lines, so every line keeps its number (tracebacks and the README's file:line pointers stay right);
the markers stay, to show the student where to write.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

MARKER = re.compile(r"^(?P<indent>[ \t]*)# --- exercise (?P<number>\d+): "
                    r"(?P<edge>begin|end) ---[ \t]*$")
# what is not copied when there is no git to list the tracked files
NOT_COPIED = {".git", "runs", "__pycache__", ".pytest_cache"}


class HandoutError(ValueError):
    """A problem the instructor must fix: a malformed region, an unusable output directory."""


@dataclass(frozen=True)
class Region:
    path: str  # relative to the repository root
    number: int
    begin: int  # 0-based index of the begin marker line
    end: int  # 0-based index of the end marker line
    indent: str


def find_regions(text: str, path: str) -> list:
    """Every exercise region of one file, in order. Malformed markers are a HandoutError naming
    path:line."""
    regions, open_marker = [], None
    for i, line in enumerate(text.splitlines()):
        m = MARKER.match(line)
        if not m:
            continue
        where, number = f"{path}:{i + 1}", int(m["number"])
        if m["edge"] == "begin":
            if open_marker:
                raise HandoutError(f"{where}: exercise {number} begins inside "
                                   f"exercise {open_marker[0]['number']}")
            open_marker = (m, i)
            continue
        if (not open_marker or int(open_marker[0]["number"]) != number
                or open_marker[0]["indent"] != m["indent"]):
            raise HandoutError(f"{where}: 'exercise {number}: end' does not match "
                               "the last begin marker")
        if i == open_marker[1] + 1:
            raise HandoutError(f"{where}: exercise {number}'s region is empty")
        regions.append(Region(path, number, open_marker[1], i, m["indent"]))
        open_marker = None
    if open_marker:
        raise HandoutError(f"{path}:{open_marker[1] + 1}: "
                           f"exercise {open_marker[0]['number']} has no end marker")
    return regions


def stub_line(indent: str, number: int, title: str) -> str:
    # json.dumps gives a valid Python string literal
    message = json.dumps(f"exercise {number}: {title}", ensure_ascii=False)
    return f"{indent}raise NotImplementedError({message})"


def blank_regions(text: str, path: str, titles: dict) -> str:
    """text with the body of every region whose exercise is in titles ({number: title}) replaced by
    the stub and blank lines (same number of lines)."""
    lines = text.splitlines(keepends=True)
    for r in find_regions(text, path):
        if r.number in titles:
            n_body = r.end - r.begin - 1
            lines[r.begin + 1:r.end] = ([stub_line(r.indent, r.number, titles[r.number]) + "\n"]
                                        + ["\n"] * (n_body - 1))
    return "".join(lines)


def is_stub(text: str, region: Region) -> bool:
    """Is this region's body still the hand-out's stub (the exercise not started)?"""
    body = [line.strip() for line in text.splitlines()[region.begin + 1:region.end] if line.strip()]
    return (len(body) == 1
            and body[0].startswith(f'raise NotImplementedError("exercise {region.number}:'))


def blank_exercises(root: str, files) -> set:
    """The exercises whose regions in root are stubs: empty for the reference repository."""
    blank = set()
    for path in files:
        text = read(os.path.join(root, path))
        blank |= {r.number for r in find_regions(text, path) if is_stub(text, r)}
    return blank


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def repository_files(root: str) -> list:
    """The files to hand out: git's tracked files that exist, or, without git, every file outside
    NOT_COPIED."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True,
                                check=True).stdout
        return sorted(p for p in listed.split("\0") if p and os.path.isfile(os.path.join(root, p)))
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in NOT_COPIED)
            files += [os.path.relpath(os.path.join(dirpath, f), root)
                      for f in filenames if not f.endswith(".pyc")]
        return sorted(files)


def check_output_dir(out: str):
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise HandoutError(f"{out} exists and is not an empty directory; choose a new path")


def write_student_copy(root: str, out: str, exercises) -> list:
    """Copy the repository at root to out with the bodies of `exercises` blanked. Written to a
    temporary directory next to out, then renamed into place (out never holds half a copy). Returns
    the files copied."""
    check_output_dir(out)
    titles = {e.number: e.title for e in exercises}
    source_files = {path for e in exercises for path in e.files}
    files = repository_files(root)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    except OSError as e:
        raise HandoutError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        for path in files:
            os.makedirs(os.path.join(tmp, os.path.dirname(path)), exist_ok=True)
            shutil.copy2(os.path.join(root, path), os.path.join(tmp, path))
        found = set()
        for path in sorted(source_files):
            text = read(os.path.join(root, path))
            found |= {r.number for r in find_regions(text, path)}
            with open(os.path.join(tmp, path), "w", encoding="utf-8") as f:
                f.write(blank_regions(text, path, titles))
        missing = sorted(set(titles) - found)
        if missing:
            raise HandoutError(f"no region marked for exercise {missing[0]} "
                               f"in {', '.join(sorted(source_files))}")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it private
        check_output_dir(out)
        os.replace(tmp, out)  # an empty directory at out is replaced too
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HandoutError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
