"""Fixtures for the generator tests: three toy tasks (files with descriptions) and a registry holding one
adapter per task on the tiny random BERT, each with four training snapshots.

The adapters are written directly (no training, milliseconds): they share one A initialisation, as
adapters trained from the same seed do, and each task moves B (and a little of A) in its own direction;
a snapshot at step s of 10 is the same move scaled by s / 10."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TOY_TASKS = {
    "flights": ("Classify the sentiment of tweets about flights, airlines and delayed planes.",
                ["flight", "plane", "crew", "seat", "gate", "late", "delayed"]),
    "music": ("Classify the sentiment of tweets about the music festival, its songs and tickets.",
              ["music", "festival", "song", "ticket", "today"]),
    "phones": ("Classify the sentiment of tweets about the apple iphone, phones and tech.",
               ["apple", "iphone", "phone", "tech", "computer"]),
}
POS, NEG = ["great", "good", "love", "thanks", "happy"], ["awful", "bad", "hate", "terrible", "angry"]


def write_task(root: Path, name: str, description: str, topic: list[str], n: int = 40, seed: int = 0) -> Path:
    rnd = random.Random(f"{name}-{seed}")
    rows = []
    for i in range(n):
        lab = "good" if i % 2 else "bad"
        words = rnd.sample(POS if lab == "good" else NEG, 2) + rnd.sample(topic, 2)
        rnd.shuffle(words)
        rows.append({"text": " ".join(words), "label": lab})
    f = root / f"{name}.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / f"{name}.task.json").write_text(json.dumps({"description": description, "labels": ["bad", "good"]}))
    return f


@pytest.fixture
def toy_tasks(tmp_path) -> dict[str, Path]:
    root = tmp_path / "tasks"
    root.mkdir()
    return {name: write_task(root, name, desc, topic) for name, (desc, topic) in TOY_TASKS.items()}


def toy_adapter(fp, *, seed: int, rank: int = 4, scale: float = 1.0, targets=("query", "value")):
    """A LoRA on the tiny BERT: A = shared init + a small task move, B = a task move; both scaled by `scale`."""
    import torch

    from loraplex.experts.spec import Adapter, LoraSpec, matches_target

    spec = LoraSpec(r=rank, alpha=2.0 * rank, target_modules=tuple(targets))
    init = torch.Generator().manual_seed(1234)
    move = torch.Generator().manual_seed(seed)
    weights = {}
    for mod in sorted(fp.modules):
        if not any(matches_target(mod, t) for t in targets):
            continue
        d_in, d_out = fp.modules[mod]
        a0 = torch.randn(rank, d_in, generator=init) / d_in**0.5
        a = a0 + scale * 0.02 * torch.randn(rank, d_in, generator=move)
        b = scale * 0.05 * torch.randn(d_out, rank, generator=move)
        weights[mod] = (a, b)
    return Adapter(spec, weights)


def add_toy(reg, settings, base_dir, name: str, task_file: Path | None, description: str, *, seed: int,
            extra: dict | None = None, **kw):
    from loraplex.data import load_task
    from loraplex.embedders import get_embedder
    from loraplex.models import fingerprint, resolve_base
    from loraplex.registry.record import AdapterDraft, Edge

    ref = resolve_base(str(base_dir))
    fp = fingerprint(ref, settings)
    adapter = toy_adapter(fp, seed=seed, **kw)
    snaps = [(s, toy_adapter(fp, seed=seed, scale=s / 10, **kw)) for s in (2, 4, 6, 8)]
    task = load_task(str(task_file)) if task_file else None
    draft = AdapterDraft(name=name, base=ref.name, base_sha=fp.sha, family=ref.family, description=description,
                         task=task.ref if task else None, origin="trained", spec=adapter.spec,
                         metrics={"steps": 10}, edges=(Edge.to_task(task.ref, "trained-on"),) if task else (),
                         extra={**({"task_cards": {task.ref: task.card()}} if task else {}),  # as registration keeps it
                                **(extra or {})})
    emb = get_embedder(settings.embedder).encode([description])[0]
    return reg.add_adapter(draft, adapter, embedding=emb, snapshots=snaps, embedder=settings.embedder,
                           fingerprint_json=fp.model_dump_json())


@pytest.fixture
def toy_registry(settings, tiny_bert, toy_tasks):
    """(settings, registry) with adapters flights-lora, music-lora, phones-lora (4 snapshots each)."""
    from loraplex import api

    reg = api.open_registry(settings)
    for i, (name, (desc, _)) in enumerate(TOY_TASKS.items()):
        add_toy(reg, settings, tiny_bert, f"{name}-lora", toy_tasks[name], desc, seed=10 + i)
    return settings, reg


FAST = {"cvae": {"steps": 150}}
