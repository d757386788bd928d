"""Files written and read safely: no reader, and no run killed half-way, ever sees half a file (write_atomic),
and reading a training state back runs no code from it (read_dcp_metadata, safe_dcp_reader_and_planner).

For every layer (data/, trainer.py, evaluation/, seeds.py, the course kit): it imports nothing from this project,
so anything may import it. (Replacing a whole directory, as model.save_checkpoint and data/toy.py do, is a
different operation and lives with them.)
"""
import os
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.metadata import StorageMeta


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


# Resuming reads a run directory, which may come from anywhere: nothing in it may run code. The model and
# optimizer tensors and rank*.pt load with weights_only=True; DCP's own .metadata (a pickle) and its byte items
# (optimizer hyper-parameters, written with torch.save) are read through the two classes below instead of
# plain pickle.load / torch.load(weights_only=False).
SAFE_METADATA_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                         ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                         ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                         ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every class but its own records, torch dtypes and sizes, paths."""

    def find_class(self, module, name):
        allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in SAFE_METADATA_CLASSES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not a class of a checkpoint's metadata")
        return super().find_class(module, name)


def read_dcp_metadata(metadata_path: str):
    """A DCP .metadata file through MetadataUnpickler; a refused class is a ValueError naming the file."""
    with open(metadata_path, "rb") as f:
        try:
            return MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{metadata_path}: {e} (a tampered or foreign file; not loaded)") from None


def safe_dcp_reader_and_planner(path: str):
    """(storage reader, load planner) for dcp.load that execute no code from the checkpoint directory."""
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
                raise ValueError(f"{path}: item {read_item.dest_index.fqn}: {str(e).splitlines()[0]} (not loaded)") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Reader(path), Planner()
