"""One process or many: torchrun's process group and FSDP2 sharding, for the training loop
(trainer.py reaches them through the Run of rundir.py).

    python x.py                       one process, nothing sharded (every function below is then a
                                      no-op)
    torchrun --nproc_per_node=N x.py  N ranks: gloo on CPU, nccl on CUDA; FSDP2 shards every block,
                                      then the root

Read top to bottom:
  1. The process group    setup_distributed reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK;
                          all_reduce_sum, barrier; end_process_group at exit
  2. FSDP2                shard_model: fully_shard(each transformer block), then fully_shard(root);
                          the stacked experts [E, ...] of an MoE layer are sharded on dim 1;
                          full_state_dict gathers them back
Precision: on CUDA, bf16 matmuls with float32 weights -- FSDP2's MixedPrecisionPolicy under torchrun
(bf16 parameters, float32 gradient reduction), bf16 autocast in one process (autocast_context);
float32 on CPU.
"""
import contextlib
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

# --------------------------------------------------------------------------------------------------
# 1. The process group


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Dist(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world_size, dev)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


def end_process_group():
    """Destroy the process group while the interpreter is fully alive (cli.py's run_cli calls it
    after main returns). Sharded modules and tensors hold the group through reference cycles; freed
    only at interpreter exit, gloo's teardown can abort the process (SIGABRT) after its work is
    done. So: free them first, then end the group."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def autocast_context(d: Dist):
    """bf16 autocast for single-GPU runs (FSDP runs get bf16 through the MixedPrecisionPolicy
    instead)."""
    if d.device.type == "cuda" and d.world_size == 1:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# 2. FSDP2


def shard_model(model, d: Dist, param_dtype=None):
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, output).

    MoE experts are stacked parameters [E, ...], so every rank reduces every expert's gradient even
    when it routed no token to it (a zero gradient), which keeps the gradients exact.
    """
    if d.world_size == 1:
        return model
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
          if param_dtype else None)
    kwargs = {"mp_policy": mp} if mp else {}
    for layer in model.layers:
        fully_shard(layer, shard_placement_fn=expert_stack_on_dim_1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def expert_stack_on_dim_1(param):
    """Stacked experts [E, ...] are sharded along dim 1: FSDP pads the sharded dim to
    ceil(n / world) rows per rank, and E = 3 experts on dim 0 would give every rank of 2 the memory
    of 2 experts (of 8: 1 each)."""
    return Shard(1) if param.dim() == 3 else None


def local_rows(param) -> tuple:
    """(tensor to fill, start, stop): the rows [start, stop) of a parameter that this rank holds,
    along the dim shard_model shards: dim 1 of a stacked expert matrix [E, ...] (= dim 0 of every
    expert's own matrix), dim 0 of anything else. FSDP2 splits that dim as torch.chunk does: rank r
    holds rows [r * ceil(n / world), ...). A plain tensor (one process, no FSDP) is all rows."""
    dim = 1 if param.dim() == 3 else 0
    if not hasattr(param, "to_local"):
        return param.data, 0, param.shape[dim]
    (placement,) = param.placements
    if placement.dim != dim:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} "
                         f"is sharded on dim {placement.dim}; "
                         f"lean_fusion expects dim {dim} (distributed.shard_model)")
    local = param.to_local()
    rank, world, n = param.device_mesh.get_local_rank(), param.device_mesh.size(), param.shape[dim]
    start = min(rank * math.ceil(n / world), n)
    return local, start, start + local.shape[dim]


def full_state_dict(model, d: Dist) -> dict:
    """Every parameter gathered to full size on CPU (collective: all ranks call it, in the same
    order)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().cpu()
    return out
