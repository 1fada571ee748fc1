"""`--gpus N`: start N worker processes through PyTorch's elastic launcher (what `torchrun` runs).

The parent resolves and validates the config once, so a mistake is reported once, before any worker starts;
the workers read that resolved config from a file named by SIMCLR_RESOLVED_CONFIG and all write to one --out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

RESOLVED_CONFIG_ENV = "SIMCLR_RESOLVED_CONFIG"
DEFAULT_MASTER_PORT = 29500


def launched_externally() -> bool:
    """True inside a torchrun/SLURM worker: the world is already set up and `--gpus` must not launch again."""
    from simclr_cli.engine.distributed import launched_externally  # lazy: keeps `simclr --help` free of torch

    return launched_externally()


def resolved_config_file() -> Path | None:
    """In a worker started by `launch(config=...)`: the resolved config its parent wrote."""
    value = os.environ.get(RESOLVED_CONFIG_ENV)
    return Path(value) if value else None


def check_gpu_count(device: str, procs: int) -> str:
    """The device type of `procs` processes: one per GPU (at most as many as there are), or CPU processes (gloo) when
    --device cpu says so; refused without a GPU otherwise, in one line, before any process starts."""
    import torch

    from simclr_cli.engine.device import DEVICES
    from simclr_cli.engine.errors import ConfigError

    if device not in DEVICES:
        raise ConfigError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if device == "mps":
        raise ConfigError(f"--gpus {procs} runs processes on cuda (nccl) or cpu (gloo), not mps; pass --device cpu, or drop --gpus")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpus {procs} but PyTorch sees no GPU on this machine; pass --device cpu to run {procs} CPU "
                          "processes (gloo), or drop --gpus")
    if procs > torch.cuda.device_count():
        raise ConfigError(f"--gpus {procs} but this machine has {torch.cuda.device_count()} GPU(s); use at most that many")
    return "cuda"


def new_run_dir(*, prefix: str) -> Path:
    """A new runs/<prefix><timestamp>/ named once, in the parent: workers naming their own would each pick another."""
    from simclr_cli.engine import rundir

    return rundir.default_run_dir(prefix=prefix).resolve()


def launch_pretrain(cfg, *, out: Path | None, resume: bool, overwrite: bool, verbose: bool, procs: int, nodes: int,
                    node_rank: int, master_addr: str | None, master_port: int | None) -> int:
    """`simclr pretrain` in `procs` workers on this node, all writing to one run folder (a new runs/<timestamp>/
    unless `out` is given), all using the config resolved here. What the workers would refuse (the device, the data,
    the batch, the run folder) is checked here first, so a mistake is one line, not one per worker."""
    from simclr_cli.engine import rundir
    from simclr_cli.engine.errors import ConfigError
    from simclr_cli.engine.plain import to_plain
    from simclr_cli.engine.tasks import pretrain

    device_type = check_gpu_count(cfg.train.device, procs)
    if nodes > 1 and out is None:  # each machine would name its own runs/<timestamp>/ from its own clock
        raise ConfigError(f"--nodes {nodes} needs --out: every machine must write to the same run folder, on storage "
                          "they all share (e.g. --out /shared/runs/r50)")
    out = (out or rundir.default_run_dir()).resolve()
    pretrain.preflight(cfg, out=out, resume=resume, overwrite=overwrite, device_type=device_type,
                       processes=procs * nodes, check_out=node_rank == 0)
    command = ["pretrain", "--out", str(out), *(["--resume"] if resume else []),
               *(["--overwrite"] if overwrite else []), *(["--verbose"] if verbose else [])]
    return launch(command, config=to_plain(cfg), procs=procs, nodes=nodes, node_rank=node_rank,
                  master_addr=master_addr, master_port=master_port)


def launch(
    command: list[str],
    *,
    config: dict | None = None,
    procs: int,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> int:
    """Run `simclr <command>` in `procs` processes on this node (of `nodes`); returns the exit code to use.

    `config`, when given, is the resolved config the workers use instead of resolving their own.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from simclr_cli.engine.device import available_cpus

    args = ["--nproc-per-node", str(procs), "--nnodes", str(nodes)]
    if nodes == 1 and master_addr is None:
        args.append("--standalone")  # a free local port, no rendezvous server to configure
    else:
        args += ["--node-rank", str(node_rank), "--master-addr", master_addr or "127.0.0.1",
                 "--master-port", str(master_port or DEFAULT_MASTER_PORT)]
    added = {}
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and print a banner saying so; the cores shared out between the processes say it better
        added["OMP_NUM_THREADS"] = str(max(1, available_cpus() // procs))
    with tempfile.TemporaryDirectory(prefix="simclr-launch-") as tmp:
        if config is not None:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            added[RESOLVED_CONFIG_ENV] = str(path)
        os.environ.update(added)
        try:
            run(get_args_parser().parse_args([*args, "-m", "simclr_cli", *command]))
        except ChildFailedError as exc:
            # each worker printed its own error; report the first failure's exit code
            first = next(iter(exc.failures.values()), None)
            return first.exitcode if first is not None and first.exitcode > 0 else 1
        finally:
            for name in added:
                os.environ.pop(name, None)
    return 0
