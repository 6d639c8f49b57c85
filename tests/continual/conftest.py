"""Fixtures for the continual tests: three tiny task files and stream specs over the tiny BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

TASKS = {
    "flights": ("Say whether a traveller's message about a flight is a complaint or praise.",
                {"bad": "flight late delayed lost bag bags awful terrible never angry hate gate".split(),
                 "good": "flight great good thanks love crew seat happy always very".split()}),
    "sports": ("Say whether a sports report is about a win or a loss.",
               {"win": "team match goal great good game happy love".split(),
                "loss": "team match bad awful game never not angry".split()}),
    "markets": ("Say whether a market headline is about prices going up, down or flat.",
                {"up": "stock price market great good happy".split(),
                 "down": "stock price market bad terrible awful".split(),
                 "flat": "stock price market today again the a".split()}),
}


def write_task(root: Path, name: str, n: int = 60, seed: int = 0) -> Path:
    desc, words = TASKS[name]
    rng = random.Random(f"{name}-{seed}")
    labels = sorted(words)
    lines = []
    for i in range(n):
        lab = labels[i % len(labels)]
        text = " ".join(rng.choice(words[lab]) for _ in range(rng.randint(4, 8)))
        lines.append(json.dumps({"text": f"{text} {i}", "label": lab}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (root / f"{name}.task.json").write_text(json.dumps({"name": name, "description": desc, "labels": labels}))
    return path


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    for name in TASKS:
        write_task(d, name)
    return d


def make_spec(path: Path, base: Path, task_dir: Path, *, method="o-lora", replay=True, experiences=None,
              steps: int = 6, distill: float = 0.0, **extra) -> Path:
    spec = {
        "name": "tiny",
        "base": str(base),
        "seed": 0,
        "lora": {"rank": 2},
        "trainer": {"steps": steps, "batch_size": 4, "eval_limit": None, "snapshots": 1, "lr": 3e-2},
        "method": method,
        "forgetting": {"name": "gs-lora", "rank": 2, "steps": steps},
        "experiences": experiences or [{"learn": str(task_dir / "flights.jsonl")},
                                       {"learn": str(task_dir / "sports.jsonl")},
                                       {"learn": str(task_dir / "markets.jsonl")}],
        **extra,
    }
    if replay:
        spec["replay"] = {"budget": 12, "policy": "class-balanced", "mix": 0.25, "distill": distill}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
