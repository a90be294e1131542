"""``benchmarks/gpu_check.py``: one line and exit 0 without CUDA; every part of it runs (toy sizes, on the CPU),
so the CUDA run is not the first time its code executes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "gpu_check: no CUDA device on this machine; nothing measured"


def test_every_part_runs_on_the_cpu_at_toy_sizes():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-write"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "part" not in line]
    assert len(rows) == 6 and all("| ok |" in row for row in rows), done.stdout
