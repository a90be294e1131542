"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_torchrun(wrapper_source: str, tmp_path: Path, args: list[str], nproc: int = 2,
                 timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=<nproc> wrapper.py <tmp_path> <args...>`` on CPU (gloo), one
    thread per worker, outside any torchrun environment the test itself may run in; asserts it succeeded.

    The wrapper (written to ``tmp_path/wrapper.py``) receives ``tmp_path`` as its first argument, e.g. to
    log which rank wrote which file, then the mkdt command line.
    """
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(wrapper_source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(wrapper),
           str(tmp_path), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`run_torchrun` as a fixture."""
    return run_torchrun

