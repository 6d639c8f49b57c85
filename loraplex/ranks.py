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


_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "JSM_NAMESPACE_SIZE")


COMMAND_LINE = False
"""Whether this process runs the `loraplex` command (set by `loraplex.cli.main`). Lightning's DDP launcher
re-runs `sys.argv` once per extra device: that is the command for the CLI, but a Python program calling
`loraplex.api` would be run again whole, every call before the training included (sweep 40)."""


_SEEN: dict[tuple, int] = {}  # rank variables -> the rank they gave beside a world of several processes


def process_rank() -> int:
    """This process's global rank (0 when it was not started as a worker of a distributed run).

    A non-zero rank counts only beside a world of several processes (Lightning's launcher and torchrun set
    WORLD_SIZE, SLURM SLURM_NTASKS): a rank variable left in a shell (`RANK=1` from an old torchrun session)
    would otherwise make every command a worker that trains, writes nothing and exits 0. It is refused.
    Once a rank is known it stays known for the same rank variables: Lightning's DDP teardown removes
    WORLD_SIZE from a worker's environment, and the worker is still one afterwards (it must not then
    evaluate, store or print as rank 0 would, nor fail on its own rank)."""
    key = tuple(os.environ.get(v) for v in (*_RANK_VARS, "LOCAL_RANK", "NODE_RANK"))
    if key in _SEEN:
        return _SEEN[key]
    rank, named = 0, ""
    for var in _RANK_VARS:
        if os.environ.get(var, "").strip().isdigit():
            rank, named = int(os.environ[var]), var
            break
    else:
        local = os.environ.get("LOCAL_RANK", "").strip()
        node = os.environ.get("NODE_RANK", "").strip()
        if local.isdigit() or node.isdigit():
            rank, named = int(node or 0) * 1000 + int(local or 0), "LOCAL_RANK" if local.isdigit() else "NODE_RANK"
    if rank and not any(os.environ.get(v, "").strip().isdigit() and int(os.environ[v]) > 1 for v in _SIZE_VARS):
        from loraplex.errors import UserInputError

        raise UserInputError(f"{named}={os.environ[named].strip()} says this process is a worker of a distributed "
                             "run, but no WORLD_SIZE (or SLURM_NTASKS) says there are several: unset it "
                             "(a leftover of torchrun or SLURM?)")
    if rank:
        _SEEN[key] = rank
    return rank


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
