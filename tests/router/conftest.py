"""Fixtures for the routing tests: tiny task files written in the tiny tokenizer's vocabulary, and a
registry holding three real-peft adapters of tiny BERT, each registered with its task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import make_peft_adapter

TOPICS = {
    "flights": ("flight plane gate seat crew bag bags delayed late lost", "great thanks love good", "awful terrible bad hate"),
    "sports": ("match goal team sport game", "great love happy good", "bad awful angry hate"),
    "phones": ("phone apple iphone tech computer", "love great good thanks", "hate bad terrible awful"),
}


def write_task(root: Path, name: str, n: int = 40, seed: int = 0) -> Path:
    """A two-label task file (good / bad) on one topic, with its sidecar description."""
    rng = random.Random(f"{name}-{seed}")
    topic, pos, neg = (w.split() for w in TOPICS[name])
    rows = []
    for i in range(n):
        label = "good" if i % 2 == 0 else "bad"
        words = rng.sample(topic, 3) + rng.sample(pos if label == "good" else neg, 2) + ["the", "very"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    p = root / f"{name}.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / f"{name}.task.json").write_text(json.dumps({
        "name": name, "description": f"is the {name} message good or bad", "labels": ["good", "bad"]}))
    return p


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {name: write_task(root, name) for name in TOPICS}


@pytest.fixture(scope="session")
def peft_dirs(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Three real-peft adapters of tiny BERT: ranks 4, 2 and 6 (mixed ranks), random non-zero weights."""
    root = tmp_path_factory.mktemp("peft")
    specs = {"flights": (4, 11), "sports": (2, 12), "phones": (6, 13)}
    return {name: make_peft_adapter(tiny_bert, root / name, r=r, alpha=2 * r, seed=seed,
                                    targets=("query", "value", "attention.output.dense"))
            for name, (r, seed) in specs.items()}


@pytest.fixture
def bert_registry(settings, tiny_bert, peft_dirs, task_files):
    """settings of a registry holding flights-lora, sports-lora, phones-lora on tiny BERT."""
    from loraplex import api

    for name, d in peft_dirs.items():
        api.register(d, name=f"{name}-lora", description=f"adapter for {name} messages", task=str(task_files[name]),
                     base=str(tiny_bert), settings=settings)
    return settings


def registered_cli(home: Path, mp: pytest.MonkeyPatch, tiny_bert, peft_dirs, task_files):
    """run(*args) for the CLI against `home`, which gets the three adapters registered (hash embedder, CPU,
    float32 through the environment); run.settings are its settings."""
    from typer.testing import CliRunner

    from loraplex import api
    from loraplex.cli import app
    from loraplex.settings import Settings

    mp.setenv("LORAPLEX_EMBEDDER", "hash")
    mp.setenv("LORAPLEX_DEVICE", "cpu")
    mp.setenv("LORAPLEX_DTYPE", "float32")
    s = Settings.load(home=home)
    for name, d in peft_dirs.items():
        api.register(d, name=f"{name}-lora", description=f"adapter for {name} messages", task=str(task_files[name]),
                     base=str(tiny_bert), settings=s)
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(a) for a in args] + ["--home", str(home)], input=input, catch_exceptions=False)

    run.home = home
    run.settings = s
    return run
