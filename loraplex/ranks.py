"""Which process of a multi-process (DDP) run this is, without importing Lightning.

Lightning's DDP launcher on one machine re-runs the whole command (`loraplex train ... --devices 2`)
in a child process per extra device, with `LOCAL_RANK` (and `NODE_RANK`, `WORLD_SIZE`) in its
environment; torchrun and SLURM set `RANK` / `SLURM_PROCID` for every process. Only rank 0 writes:
run directories, checkpoints, reports and the registry. The other ranks (workers) do the same
computation, so that their collectives match, and write nothing.

Rank 0 names the run directory before Lightning starts the workers and passes it to them through
`LORAPLEX_RUN_DIR`, because a worker started a second later would otherwise name another one (the
default name carries a time stamp)."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR_ENV = "LORAPLEX_RUN_DIR"
_RANK_VARS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """This process's global rank (0 when it was not started as a worker of a distributed run)."""
    for var in _RANK_VARS:
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    local = os.environ.get("LOCAL_RANK", "").strip()
    node = os.environ.get("NODE_RANK", "").strip()
    if local.isdigit() or node.isdigit():
        return int(node or 0) * 1000 + int(local or 0)  # any non-zero pair is a worker
    return 0


def is_worker() -> bool:
    """True in a DDP worker (rank > 0): it trains alongside rank 0 and writes nothing."""
    return process_rank() != 0


def shared_run_dir(default: Path) -> Path:
    """The run directory every rank uses: rank 0's `default`, published to the workers it will start;
    a worker reads the one rank 0 published (its own default would differ)."""
    if is_worker() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    os.environ[RUN_DIR_ENV] = str(default)
    return Path(default)
