"""Shared fixtures: tiny randomly initialised models saved as local HF directories, PEFT adapters made
with the real `peft`, and settings that point at a temporary registry with the fast `hash` embedder.

Everything runs offline on CPU with fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an is was of to and in on for with flight late delayed lost bag bags crew seat gate plane "
    "great good bad awful terrible thanks love hate happy angry service staff news sport match goal "
    "team election vote party phone apple iphone car driverless music festival ticket game market "
    "stock price film song tech computer today again never always very not"
).split()


EXTRA_WORDS = "win loss up down flat".split()
"""Words after the letters: the tiny models are built for the vocabulary without them (so their weights
stay what the tests were written against) and then grown to hold them (`resize_token_embeddings`): label
names the tests use that were read as one unknown token, which a task's labels may not all be."""


def _write_vocab(path: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)] + EXTRA_WORDS
    path.write_text("\n".join(vocab) + "\n")
    return path


def _tokenizer(dirpath: Path):
    """A word-level BERT tokenizer over WORDS (transformers 5 takes `vocab=`, older versions `vocab_file=`)."""
    import inspect

    from transformers import BertTokenizer

    vocab_path = _write_vocab(dirpath.parent / f"{dirpath.name}-vocab.txt")
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:
        words = vocab_path.read_text().split()
        return BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    return BertTokenizer(vocab_file=str(vocab_path))


def save_tiny(kind: str, root: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `kind` (bert, llama, gpt2) with a word-piece tokenizer; return its dir."""
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    d = root / f"tiny-{kind}"
    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(d)
    vocab = len(tok) - len(EXTRA_WORDS)
    if kind == "bert":
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=vocab, max_position_embeddings=128))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                                             max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
                                             eos_token_id=3, tie_word_embeddings=False))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=256,
                                           bos_token_id=2, eos_token_id=3, pad_token_id=0))
    else:
        raise ValueError(kind)
    model.resize_token_embeddings(max(tok.get_vocab().values()) + 1)  # ids, not names: "a" is a word and a letter
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_bert(tiny_root) -> Path:
    return save_tiny("bert", tiny_root)


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> Path:
    return save_tiny("llama", tiny_root)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_root) -> Path:
    return save_tiny("gpt2", tiny_root)


def make_peft_adapter(base_dir: Path, out: Path, *, r: int = 4, alpha: float = 8, targets=("query", "value"),
                      seed: int = 1, causal: bool = False, **extra) -> Path:
    """A PEFT LoRA directory with non-zero random A and B, written by the real peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(base_dir))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                     init_lora_weights=False, **extra)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(str(out))
    return out


@pytest.fixture
def settings(tmp_path):
    from loraplex.settings import Settings

    return Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32",
                         cache_dir=tmp_path / "cache")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process against a temporary registry (hash embedder). Returns run(*args) -> result."""
    from typer.testing import CliRunner

    from loraplex.cli import app

    home = tmp_path / "home"
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    monkeypatch.setenv("LORAPLEX_EMBEDDER", "hash")
    monkeypatch.setenv("LORAPLEX_DEVICE", "cpu")
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    run.home = home
    return run


def registry_state(home: Path) -> tuple:
    """A comparable snapshot of a registry: its rows and its blob files (for 'left as it was' checks)."""
    import sqlite3

    db = home / "registry.db"
    rows: tuple = ()
    if db.exists():
        conn = sqlite3.connect(db)
        rows = tuple(
            tuple(conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall())
            for t in ("adapters", "edges", "snapshots", "components", "bases")
        )
        conn.close()
    blobs = tuple(sorted(p.name for p in (home / "blobs").glob("*/*"))) if (home / "blobs").exists() else ()
    return rows, blobs
