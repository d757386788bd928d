"""Files written and read safely: no reader, and no run killed half-way, ever sees half a file or
half a directory (write_atomic, replace_dir + recover_dir), nothing is written over what this
project did not write (refuse_foreign_dir), nothing deleted that a marker does not prove is this
project's own leftover (recover_dir), and reading a training state back runs no code from it
(read_dcp_metadata, safe_dcp_reader_and_planner).

For every layer (model.py, data/, trainer.py, evaluation/ with `python -m evaluation.seeds`, the
course kit): it imports nothing from this project, so anything may import it.
"""
import glob
import os
import pickle
import shutil
import tempfile

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # DefaultLoadPlanner.load_bytes's
from torch.distributed.checkpoint.metadata import StorageMeta


def write_atomic(path: str, data):
    """Write `data` (str, as UTF-8, or bytes) to `path` through a temporary file in the same
    directory and a rename (atomic on POSIX and Windows): `path` holds the old content or the new,
    never a part. Creates the directory."""
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


def refuse_foreign_dir(path: str, marker: str, kind: str):
    """A directory a command may write into is missing, empty, or holds its own `marker` file
    (params.json of a checkpoint, run.json of a training run, results.json of an evaluation).
    Anything else belongs to someone else: FileExistsError, naming what was found; nothing is
    touched."""
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)
                                and not os.path.exists(os.path.join(path, marker))):
        found = sorted(os.listdir(path))[:5] if os.path.isdir(path) else "a file"
        raise FileExistsError(f"{path}: exists and is not {kind} (found {found}; expected "
                              f"{marker}); refusing to touch it, choose another path")


def replace_dir(path: str, fill, marker: str, kind: str):
    """Write the directory `path` as a whole: fill(new) writes every file into .NAME.tmp-*/copy
    beside it, `marker` last (its presence marks the copy complete); an existing `path` moves into
    .NAME.old-*/copy, the new copy is renamed to `path`, and the old one is deleted. Both
    .NAME.tmp-* and .NAME.old-* hold REPLACE_MARKER, which names `path`: recover_dir finishes or
    rolls back a replacement a kill stopped at any of these steps, and touches no directory without
    that proof.
    It runs first, and a `path` that is not `kind` (no `marker`) is refused before fill runs
    (refuse_foreign_dir). (checkpoints.save_checkpoint writes checkpoints this way, marker
    params.json; data.toy the synthetic world, marker manifest.json.)"""
    path = os.path.abspath(path)
    recover_dir(path, marker)
    refuse_foreign_dir(path, marker, kind)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = make_own_dir(path, "tmp")
    try:
        new = os.path.join(tmp, "copy")
        os.mkdir(new)
        fill(new)
        if not os.path.isfile(os.path.join(new, marker)):
            raise RuntimeError(f"replace_dir({path}): fill() did not write {marker}")
        old = None
        if os.path.exists(path):
            old = make_own_dir(path, "old")
            os.replace(path, os.path.join(old, "copy"))
        os.replace(new, path)
        if old:
            shutil.rmtree(old)
        shutil.rmtree(tmp)  # now only its REPLACE_MARKER
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


REPLACE_MARKER = ".replace_dir"  # in every .NAME.tmp-* / .NAME.old-* that replace_dir makes


def marker_text(path: str) -> str:
    return f"fileio.replace_dir: a temporary directory of {path}\n"


def make_own_dir(path: str, role: str) -> str:
    """A new .NAME.{role}-* directory beside `path`, holding only REPLACE_MARKER (naming `path`)."""
    parent, name = os.path.split(path)
    own = tempfile.mkdtemp(prefix=f".{name}.{role}-", dir=parent)
    with open(os.path.join(own, REPLACE_MARKER), "w") as f:
        f.write(marker_text(path))
    return own


def is_own_dir(directory: str, path: str) -> bool:
    """True when `directory` holds the REPLACE_MARKER that replace_dir(path) wrote: the proof that
    it is a temporary directory of this project's, not someone else's that only looks like one."""
    marker = os.path.join(directory, REPLACE_MARKER)
    if not os.path.isfile(marker) or os.path.getsize(marker) > 4096:
        return False
    with open(marker, encoding="utf-8", errors="replace") as f:
        return f.read() == marker_text(path)


def own_leftovers(path: str, role: str) -> list:
    """The .NAME.{role}-* directories beside `path` that replace_dir(path) left (is_own_dir), oldest
    first."""
    parent, name = os.path.split(os.path.abspath(path))
    found = glob.glob(os.path.join(parent, f".{glob.escape(name)}.{role}-*"))
    return sorted((d for d in found if is_own_dir(d, os.path.abspath(path))), key=os.path.getmtime)


def recover_dir(path: str, marker):
    """Finish or roll back a replace_dir that a kill interrupted: afterwards `path` is the newest
    complete copy (one holding `marker`, or any of them for a tuple: a checkpoint is Meta's or HF's)
    and no .NAME.tmp-* / .NAME.old-* leftover of replace_dir's remains. Only directories that hold
    replace_dir's REPLACE_MARKER for `path` are moved or deleted: a directory that merely has such a
    name is someone else's and stays. Recovery writes, so only commands that write call it (never a
    read of a checkpoint)."""
    path = os.path.abspath(path)
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    if not os.path.isdir(os.path.dirname(path)):
        return
    tmps, olds = own_leftovers(path, "tmp"), own_leftovers(path, "old")
    if not os.path.exists(path):
        new_copies, old_copies = complete_copies(tmps, markers), complete_copies(olds, markers)
        if new_copies:  # killed between the two renames: the new copy is whole
            os.replace(new_copies[-1], path)
        elif old_copies:  # the old copy is the last complete one
            os.replace(old_copies[-1], path)
    for leftover in tmps + olds:
        shutil.rmtree(leftover, ignore_errors=True)


def complete_copies(own_dirs: list, markers: tuple) -> list:
    """The copy/ in each of replace_dir's directories that holds one of `markers` (is complete)."""
    copies = [os.path.join(d, "copy") for d in own_dirs]
    return [c for c in copies if any(os.path.isfile(os.path.join(c, m)) for m in markers)]


# Resuming reads a run directory, which may come from anywhere: nothing in it may run code. The
# model and optimizer tensors and rank*.pt load with weights_only=True; DCP's own .metadata (a
# pickle) and its byte items (optimizer hyper-parameters, written with torch.save) are read through
# the two classes below instead of plain pickle.load / torch.load(weights_only=False).
SAFE_METADATA_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                         ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                         ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                         ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
                         ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every class but its own records,
    torch dtypes and sizes, paths."""

    def find_class(self, module, name):
        allowed = (module == "torch.distributed.checkpoint.metadata"
                   or (module, name) in SAFE_METADATA_CLASSES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not a class of a checkpoint's "
                                         f"metadata")
        return super().find_class(module, name)


def read_dcp_metadata(metadata_path: str):
    """A DCP .metadata file through MetadataUnpickler; a refused class is a ValueError naming the
    file."""
    with open(metadata_path, "rb") as f:
        try:
            return MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{metadata_path}: {e} "
                             f"(a tampered or foreign file; not loaded)") from None


def safe_dcp_reader_and_planner(path: str):
    """(storage reader, load planner) for dcp.load that execute no code from the checkpoint
    directory."""
    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path}: item {read_item.dest_index.fqn}: "
                                 f"{str(e).splitlines()[0]} (not loaded)") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Reader(path), Planner()
