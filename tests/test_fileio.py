"""fileio.write_atomic: the one way every layer writes a file (temporary file, then rename)."""
import os

import pytest

from engineering.fileio import write_atomic


def test_write_atomic_writes_text_and_bytes_and_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "new" / "dir" / "out.md"
    write_atomic(str(path), "héllo ↑\n")  # creates the directory; text is UTF-8 whatever the locale
    assert path.read_bytes() == "héllo ↑\n".encode()
    write_atomic(str(path), b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    with pytest.raises(AttributeError):
        write_atomic(str(path), 42)  # fails while writing the temporary file: the old content stays whole
    assert path.read_bytes() == b"\x00bytes" and os.listdir(path.parent) == ["out.md"]  # no temporary file left
