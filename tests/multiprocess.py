"""The 2-process harness: run a test's worker on 2 spawned CPU processes joined by gloo, as torchrun would.

"spawn", not fork: forking a process whose OpenMP and gloo threads may already run is not reliable. A worker
asserts inside its process; a failure there re-raises in the test with its traceback, a hang fails after a
timeout. Workers (and their arguments) must be importable/picklable: module-level functions taking plain values.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from simclr_cli.engine import distributed
from simclr_cli.engine.distributed import World

WORLD_SIZE = 2
TIMEOUT_S = 120  # a whole 2-process test; collectives themselves time out after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, worker, port: int, args: tuple) -> None:
    """What each spawned process runs: the torchrun environment, then the real init path, then the worker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(local_rank))
    torch.set_num_threads(1)  # 2 processes on a 2-core machine
    world = distributed.from_environment()
    assert world == World(rank=local_rank, world_size=WORLD_SIZE, local_rank=local_rank)
    distributed.init(world, device_type="cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        worker(world, *args)
    finally:
        distributed.shutdown()


def run_on_two_processes(worker, *args, timeout_s: float = TIMEOUT_S) -> None:
    """Run worker(world, *args) on 2 gloo processes; re-raise a worker's failure; fail instead of hanging."""
    context = mp.start_processes(_entry, args=(worker, _free_port(), args), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process test did not finish within {timeout_s} s (a collective hung?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


def simclr_on_two_processes(*args: str) -> subprocess.CompletedProcess:
    """`simclr ARGS --gpus 2` in a subprocess, each worker on one thread (OMP_NUM_THREADS=1) like the suite's own
    process (conftest), so its numbers compare bit for bit with an in-process run; fails unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--gpus", "2"], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
