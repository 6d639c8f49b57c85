"""Annotated option aliases shared by the commands (one place for names, defaults and help)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Home = Annotated[
    Optional[Path],
    typer.Option("--home", help="Registry directory (default: $LORAPLEX_HOME, else ~/.loraplex).", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Base = Annotated[
    Optional[str],
    typer.Option("--base", help="Base model: minilm, smollm2, or a local model directory."),
]
Task = Annotated[str, typer.Option("--task", help="An embedded task name, or a .jsonl/.csv task file.")]
Description = Annotated[
    Optional[str],
    typer.Option("--description", help="What the task is, in words (used for search and routing)."),
]

Devices = Annotated[str, typer.Option("--devices", help="Lightning devices (a number or 'auto').")]
Strategy = Annotated[str, typer.Option("--strategy", help="Lightning strategy: auto, ddp, fsdp.")]
Precision = Annotated[str, typer.Option("--precision", help="Lightning precision: 32-true, bf16-mixed, 16-mixed.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def settings(home: Optional[Path]):
    """Settings for a command: --home wins over $LORAPLEX_HOME."""
    from loraplex.settings import Settings

    return Settings.load(home=home)
