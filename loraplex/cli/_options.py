"""Annotated option aliases shared by the commands (one place for names, defaults and help)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

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


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs -> a config dict, for every command that takes them: keys with `-` read as
    `_`, `a.b=1` nests, values read as JSON when they parse (2, 0.5, true, [64, 64]), else as text (the
    config's pydantic model then checks types and ranges)."""
    from loraplex.errors import InvalidSpec

    cfg: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSpec(f"--set takes KEY=VALUE, got {item!r}")
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = cfg
        parts = [p.strip().replace("-", "_") for p in key.strip().split(".")]
        if not all(parts):
            raise InvalidSpec(f"--set {item!r}: an empty name in {key.strip()!r}")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InvalidSpec(f"--set {item!r}: {p!r} is not a group of settings")
        node[parts[-1]] = value
    return cfg
