"""Run by tests/test_moe_fsdp.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Two MoE layers (E=3, k=2) are sharded with FSDP2 (experts stacked on dim 0: 3 experts over 2
ranks = uneven shards). Rank 0's tokens are routed to experts {0, 1} only, rank 1's to {1, 2}
only, so each rank leaves one expert idle. The gradients of MSE + lambda * L_G + L_R (drift, with
W != W0) must equal those of one process on the concatenated batch. Exits non-zero (with a
message) on any mismatch.

losses.drift_loss is the equation alone: W^0 sharded like the experts (fuse.py snapshots it after
sharding) needs nothing more; a plain W^0 beside sharded experts needs DTensor's implicit
replication, which the caller provides from outside (`with implicit_replication():`), as both
cases below check.
"""
import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engineering.distributed import end_process_group  # noqa: E402
from losses import drift_loss, gating_loss  # noqa: E402
from moe import MoE, collect_router_probs, snapshot_expert_weights  # noqa: E402

DIM, HIDDEN, E, K = 8, 16, 3, 2
B_PER_RANK, T = 2, 5
GAMMA, LAMBDA = [0.3, 0.1, 0.2], 0.5


class TwoMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(MoE(DIM, HIDDEN, E, K) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)  # [B, T, D]
        return x


def make_net():
    torch.manual_seed(0)
    net = TwoMoE()
    with torch.no_grad():
        for layer in net.layers:
            # small expert outputs: layer 1 sees nearly layer 0's input, same routing
            layer.w2.mul_(0.05)
            layer.router.weight.zero_()
            layer.router.weight[:, :E] = 4 * torch.eye(E)  # logit e = 4 * x[e]
    return net


def rank_batch(rank):
    """Rank 0: x[:, :, :3] ~ (+1, +1, -1) -> experts 0, 1; rank 1: (-1, +1, +1) -> experts 1, 2."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B_PER_RANK, T, DIM, generator=g) * 0.1  # [B, T, D]
    x[:, :, :E] += torch.tensor([1.0, 1.0, -1.0] if rank == 0 else [-1.0, 1.0, 1.0])
    y = torch.randn(B_PER_RANK, T, DIM, generator=g)  # [B, T, D] regression target
    mask = torch.ones(B_PER_RANK, T, dtype=torch.bool)
    mask[0, -2:] = False  # some padding
    task = torch.tensor([rank, 2 - rank])  # [B]
    return x, y, mask, task


def outside_context(w0):
    """What the caller puts around drift_loss: implicit replication for a plain W^0, nothing for a
    sharded one."""
    sharded = isinstance(next(iter(w0.values())), DTensor)
    return contextlib.nullcontext() if sharded else implicit_replication()


def loss_fn(net, x, y, mask, task, w0):
    out = net(x)  # [B, T, D]
    mse = ((out - y) ** 2).mean()
    with outside_context(w0):
        drift = drift_loss(net, w0, GAMMA)
    return mse + LAMBDA * gating_loss(collect_router_probs(net), mask, task) + drift


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    failures, expected_used = compare_with_one_process(rank, dist.get_world_size())
    end_process_group()  # after compare_with_one_process returned and freed its sharded modules
    if failures:
        print("\n".join(failures), flush=True)
        sys.exit(1)
    print(f"rank {rank}: OK (routed to {expected_used}, all gradients match one process)",
          flush=True)


def compare_with_one_process(rank, world):
    """(failures, the experts this rank should route to): the sharded model against a one-process
    copy."""
    assert world == 2, world
    net = make_net()
    w0_plain = snapshot_expert_weights(net)  # taken at "build time", before any sharding
    with torch.no_grad():  # the experts have trained a little: W != W0, so L_R has a gradient
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    ref = copy.deepcopy(net)

    mesh = init_device_mesh("cpu", (world,))
    for layer in net.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)

    snap = snapshot_expert_weights(net)
    local_rows = snap["layers.0.w1"].to_local().shape[0]
    assert (isinstance(snap["layers.0.w1"], DTensor)
            and local_rows == (2 if rank == 0 else 1)), local_rows
    w0_sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in w0_plain.items()}

    batches = [rank_batch(r) for r in range(world)]
    x, y, mask, task = batches[rank]
    full = [torch.cat([b[i] for b in batches]) for i in range(4)]

    ref_loss = loss_fn(ref, *full, w0_plain)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    failures = []
    for w0_name, w0 in (("plain W0", w0_plain), ("sharded W0", w0_sharded)):
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net, x, y, mask, task, w0)
        used = torch.cat([m.expert_idx.reshape(-1) for m in net.layers]).unique().tolist()
        expected_used = [0, 1] if rank == 0 else [1, 2]
        if used != expected_used:
            failures.append(f"rank {rank} routed to experts {used}, expected {expected_used}")
        loss.backward()
        for n, p in net.named_parameters():
            assert p.grad is not None, n
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            err = (g - ref_grads[n]).abs().max().item()
            if not torch.allclose(g, ref_grads[n], atol=1e-6, rtol=1e-5):
                failures.append(f"rank {rank} {w0_name}: grad of {n} differs from one process "
                                f"by {err:.3g}")
        # the drift loss itself must be the same number on every rank and equal the reference
        with outside_context(w0):
            d_sharded = drift_loss(net, w0, GAMMA).item()
        d_ref = drift_loss(ref, w0_plain, GAMMA).item()
        if abs(d_sharded - d_ref) > 1e-6:
            failures.append(f"rank {rank} {w0_name}: drift loss {d_sharded} != {d_ref}")
    dist.barrier()
    return failures, expected_used


if __name__ == "__main__":
    main()
