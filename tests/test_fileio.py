"""fileio.write_atomic: the one way every layer writes a file (temporary file, then rename);
recover_dir finishes an interrupted replace_dir and touches nothing it did not mark."""
import os
import shutil

import pytest

from engineering.fileio import REPLACE_MARKER, make_own_dir, recover_dir, write_atomic


def test_write_atomic_writes_text_and_bytes_and_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "new" / "dir" / "out.md"
    write_atomic(str(path), "héllo ↑\n")  # creates the directory; text is UTF-8 whatever the locale
    assert path.read_bytes() == "héllo ↑\n".encode()
    write_atomic(str(path), b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    with pytest.raises(AttributeError):
        # fails while writing the temporary file: the old content stays whole
        write_atomic(str(path), 42)
    # no temporary file left
    assert path.read_bytes() == b"\x00bytes" and os.listdir(path.parent) == ["out.md"]


def test_recover_dir_touches_only_the_leftovers_replace_dir_marked_for_that_path(tmp_path):
    """recover_dir(path) finishes an interrupted replace_dir from the .NAME.tmp-* / .NAME.old-* that
    hold replace_dir's marker naming `path`; a look-alike without it, or with a marker naming
    another path (a copied directory), is someone else's and stays."""
    path = str(tmp_path / "out")
    new = make_own_dir(path, "tmp")  # what a kill between replace_dir's two renames leaves
    os.mkdir(os.path.join(new, "copy"))
    write_atomic(os.path.join(new, "copy", "done.json"), "{}")
    lookalike = tmp_path / ".out.tmp-mine"
    (lookalike / "copy").mkdir(parents=True)
    (lookalike / "copy" / "done.json").write_text("mine")  # complete-looking, but unmarked
    moved = shutil.copytree(new, tmp_path / ".out.old-moved")  # marked, but for another path:
    marker = (moved / REPLACE_MARKER).read_text()
    (moved / REPLACE_MARKER).write_text(marker.replace(path, path + "2"))
    recover_dir(path, "done.json")
    assert sorted(os.listdir(tmp_path)) == [".out.old-moved", ".out.tmp-mine", "out"]
    assert (tmp_path / "out" / "done.json").read_text() == "{}"
    assert (lookalike / "copy" / "done.json").read_text() == "mine"
