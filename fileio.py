"""Writing a file so that no reader, and no run killed half-way, ever sees half of it.

One function, for every layer (data/, trainer.py, evaluation/, seeds.py, the course kit): it imports nothing from
this project, so anything may import it. (Replacing a whole directory,
as model.save_checkpoint and data/toy.py do, is a different operation and lives with them.)
"""
import os


def write_atomic(path: str, data):
    """Write `data` (str, as UTF-8, or bytes) to `path` through a temporary file in the same directory and a rename
    (atomic on POSIX and Windows): `path` holds the old content or the new, never a part. Creates the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
