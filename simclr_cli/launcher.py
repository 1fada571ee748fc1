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
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


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

    args = ["--nproc-per-node", str(procs), "--nnodes", str(nodes)]
    if nodes == 1 and master_addr is None:
        args.append("--standalone")  # a free local port, no rendezvous server to configure
    else:
        args += ["--node-rank", str(node_rank), "--master-addr", master_addr or "127.0.0.1",
                 "--master-port", str(master_port or DEFAULT_MASTER_PORT)]
    with tempfile.TemporaryDirectory(prefix="simclr-launch-") as tmp:
        if config is not None:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            os.environ[RESOLVED_CONFIG_ENV] = str(path)
        try:
            run(get_args_parser().parse_args([*args, "-m", "simclr_cli", *command]))
        except ChildFailedError as exc:
            # each worker printed its own error; report the first failure's exit code
            first = next(iter(exc.failures.values()), None)
            return first.exitcode if first is not None and first.exitcode > 0 else 1
        finally:
            os.environ.pop(RESOLVED_CONFIG_ENV, None)
    return 0
