"""Two ranks under FSDP2 (torchrun, gloo) that route to different experts get one process's
gradients."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_fsdp2_two_ranks_match_one_process_gradients():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "fsdp_moe_worker.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("OK (routed to") == 2, output[-4000:]
    assert "rank 0: OK (routed to [0, 1]" in output and "rank 1: OK (routed to [1, 2]" in output


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ranks_build_the_fused_model_from_their_own_rows():
    """engineering/lean_fusion.py build_fused_model under FSDP (meta device, shard, each rank reads
    only its rows; router init "hidden" through the sharded model itself): the gathered weights
    equal a one-process build, bit for bit, both for the lean build and for 'build everything, then
    shard'. Memory is what bench_fuse_memory measures."""
    root = os.path.dirname(HERE)
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_fuse_memory.py"),
                             "--dim", "128", "--layers", "2", "--check"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("lean", "full"))]
    assert len(rows) == 4 and all(line.endswith("gathered == 1-process build: True")
                                  for line in rows), result.stdout
