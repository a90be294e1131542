"""``mkdt.distributed``: sharding, collectives and rank-0-only writing under a real 2-process torchrun
(gloo on CPU), and the same calls as no-ops in a plain single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mkdt.distributed import (DistContext, all_gather_object, all_reduce_mean, assert_in_sync, barrier,
                              broadcast_object, gather_records, init_distributed, launched_by_torchrun,
                              main_process_only, shard, shard_indices)
from mkdt.errors import MkdtError

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from mkdt.distributed import (all_gather_object, all_reduce_mean, assert_in_sync, barrier, broadcast_object,
                                  broadcast_tensors, gather_records, init_distributed, main_process_only, shard)

    out = Path(sys.argv[1])
    ctx = init_distributed("cpu")
    again = init_distributed("cpu")  # a second stage in the same process reuses the group
    mine = shard(list(range(7)), ctx)
    blocks = shard(list("abcdefg"), ctx, mode="contiguous")
    grads = {"images": torch.full((2, 3), float(ctx.rank + 1)), "lr": torch.tensor(10.0 * ctx.rank),
             "absent": None}
    all_reduce_mean(grads, ctx)
    replica = torch.arange(4.0) * (ctx.rank + 1)
    broadcast_tensors(replica, ctx)
    assert_in_sync(replica, ctx, "replica")
    try:
        assert_in_sync(torch.tensor([float(ctx.rank)]), ctx, "rank id")
        caught = False
    except Exception:
        caught = True
    token = broadcast_object({"from": ctx.rank}, ctx)
    gathered = all_gather_object(ctx.rank * 100, ctx)
    merged = gather_records({f"job{i}": ctx.rank for i in mine}, ctx)

    @main_process_only
    def write(path):
        path.write_text("written by the main process")
        return "wrote"

    wrote = write(out / "main.txt")
    barrier(ctx)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({
        "rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "is_main": ctx.is_main,
        "same_group": again == ctx, "mine": mine, "blocks": blocks, "images": grads["images"].tolist(),
        "lr": grads["lr"].item(), "replica": replica.tolist(), "caught": caught, "token": token,
        "gathered": gathered, "merged": merged, "wrote": wrote, "device": str(ctx.device)}))
""")


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N script args`` on CPU, 1 thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_two_processes_shard_reduce_gather(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    torchrun(script, str(tmp_path))
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert [x["rank"] for x in r] == [0, 1] and all(x["world"] == 2 and x["backend"] == "gloo" for x in r)
    assert [x["is_main"] for x in r] == [True, False] and all(x["same_group"] for x in r)
    assert all(x["device"] == "cpu" for x in r)
    # Round-robin and contiguous shards: disjoint, complete, in order.
    assert r[0]["mine"] == [0, 2, 4, 6] and r[1]["mine"] == [1, 3, 5]
    assert r[0]["blocks"] + r[1]["blocks"] == list("abcdefg")
    # Mean of 1 and 2 is 1.5 everywhere; lr mean of 0 and 10 is 5; identical on both ranks.
    for x in r:
        assert x["images"] == [[1.5] * 3] * 2 and x["lr"] == pytest.approx(5.0)
        assert x["replica"] == [0.0, 1.0, 2.0, 3.0]  # rank 0's values broadcast
        assert x["caught"]  # diverged replicas are detected
        assert x["token"] == {"from": 0} and x["gathered"] == [0, 100]
        assert x["merged"] == {f"job{i}": i % 2 for i in range(7)}
    assert r[0]["wrote"] == "wrote" and r[1]["wrote"] is None
    assert (tmp_path / "main.txt").read_text() == "written by the main process"


def test_single_process_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    ctx = init_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert ctx.is_main and not ctx.distributed
    assert shard([3, 1, 2], ctx) == [3, 1, 2]
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t, ctx) is t and t.tolist() == [1.0, 2.0]
    assert broadcast_object("x", ctx) == "x" and all_gather_object(5, ctx) == [5]
    assert gather_records({"a": 1}, ctx) == {"a": 1}
    barrier(ctx)
    assert_in_sync(t, ctx)
    assert main_process_only(lambda: 7)() == 7


@pytest.mark.parametrize("n,world", [(0, 3), (5, 1), (7, 3), (10, 4), (2, 5)])
@pytest.mark.parametrize("mode", ["round_robin", "contiguous"])
def test_shards_partition_every_index_once(n, world, mode):
    parts = [shard_indices(n, k, world, mode) for k in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if mode == "contiguous":
        assert [i for p in parts for i in p] == list(range(n))


def test_bad_environment_is_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "five")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(MkdtError, match="RANK='five'"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(MkdtError, match="MASTER_ADDR"):
        init_distributed("cpu")
    with pytest.raises(MkdtError, match="shard mode"):
        shard_indices(3, 0, 2, "striped")
