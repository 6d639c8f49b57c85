"""Contract tests over every registered generator: layout round trip, shapes, seeded sampling, save/load."""

from __future__ import annotations

import pytest
import torch

from loraplex.generators.base import GENERATORS, GenContext, OutOfRange, Query
from loraplex.generators.layout import ParamLayout
from loraplex.generators import workflow

from .conftest import FAST, TOY_TASKS

METHODS = GENERATORS.names()
QUERY = Query("Classify the sentiment of tweets about flights and trains, delays and late crews.",
              [("great flight crew", "good"), ("awful late plane", "bad"), ("love the gate staff", "good")])


def test_catalog_lists_both_methods():
    assert {"sg-lora", "icm-lora"} <= set(METHODS)


def _fit(method, settings, reg, **cfg):
    entry = GENERATORS.get(method)
    config = entry.make_config({**FAST, **cfg})
    data = workflow.training_set(reg, [f"{n}-lora" for n in TOY_TASKS], snapshots=config.snapshots)
    gen = entry.factory(config, GenContext(settings, reg.embedder_name, data.base))
    metrics = gen.fit(data)
    return gen, data, metrics


@pytest.mark.parametrize("method", METHODS)
def test_fit_shapes_and_layout_round_trip(method, toy_registry):
    settings, reg = toy_registry
    gen, data, m = _fit(method, settings, reg)
    assert data.vectors.shape == (3 * 5, data.layout.size)  # 3 adapters + 4 snapshots each
    assert m["members"] == 3 and m["vectors"] == 15 and 1 <= m["space_dims"] <= 14
    assert m["space_error"] < 0.05  # the basis spans the training vectors
    out = gen.generate(QUERY, seed=0)
    ad = out.adapter
    assert ParamLayout.of(ad) == data.layout
    for mod, (a, b) in ad.weights.items():
        ref_a, ref_b = reg.load_adapter("flights-lora")[1].weights[mod]
        assert a.shape == ref_a.shape and b.shape == ref_b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    v = data.layout.flatten(ad)
    assert torch.equal(data.layout.flatten(data.layout.unflatten(v)), v)
    assert [p["name"] for p in out.parents][0] in data.members and len(out.parents) == min(3, len(data.members))
    assert abs(sum(p["weight"] for p in out.parents) - 1) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_sampling_is_deterministic_for_a_seed(method, toy_registry):
    settings, reg = toy_registry
    gen, data, _ = _fit(method, settings, reg)
    v0 = data.layout.flatten(gen.generate(QUERY, seed=7).adapter)
    v1 = data.layout.flatten(gen.generate(QUERY, seed=7).adapter)
    v2 = data.layout.flatten(gen.generate(QUERY, seed=8).adapter)
    assert torch.equal(v0, v1)
    assert not torch.equal(v0, v2)
    # the fit itself is deterministic too
    gen_b, _, _ = _fit(method, settings, reg)
    assert torch.allclose(v0, data.layout.flatten(gen_b.generate(QUERY, seed=7).adapter), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_through_the_registry(method, toy_registry):
    settings, reg = toy_registry
    summary = workflow.fit(reg, settings, "g", method=method, config=FAST)
    assert summary["members"] == ["flights-lora", "music-lora", "phones-lora"]
    # the generator stores far fewer numbers than the adapters it learned from (the basis is not stored)
    assert summary["stored_params"] < summary["trained_params"]
    rec, gen = workflow.load(reg, settings, "g")
    assert rec.method == method
    fresh, data, _ = _fit(method, settings, reg)
    a = data.layout.flatten(gen.generate(QUERY, seed=3).adapter)
    b = data.layout.flatten(fresh.generate(QUERY, seed=3).adapter)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_is_refused_with_distance_and_threshold(method, toy_registry):
    settings, reg = toy_registry
    gen, _, _ = _fit(method, settings, reg, max_distance=1e-6)
    with pytest.raises(OutOfRange, match=r"cosine distance \d\.\d{3} .*beyond max_distance 1e-06"):
        gen.generate(QUERY, seed=0)


def test_sg_lora_prior_is_the_top_k_mixture(toy_registry):
    """With one expert in the top-k and no noise, SG-LoRA's prior is that expert's posterior mean."""
    settings, reg = toy_registry
    gen, data, _ = _fit("sg-lora", settings, reg, top_k=1, sample_scale=0.0)
    mu, logvar = gen._member_posteriors()
    w = torch.tensor([0.0, 1.0, 0.0])
    mean, std = gen.prior(mu, logvar, w)
    assert torch.allclose(mean, mu[1]) and torch.allclose(std, (0.5 * logvar[1]).exp(), atol=1e-5)
    w = torch.tensor([0.5, 0.5, 0.0])
    mean, std = gen.prior(mu, logvar, w)
    assert torch.allclose(mean, (mu[0] + mu[1]) / 2)
    assert (std >= torch.minimum((0.5 * logvar[0]).exp(), (0.5 * logvar[1]).exp()) - 1e-6).all()


def test_a_member_description_regenerates_close_to_that_member(toy_registry):
    """The CVAE has learned its training set: asked for a member's own task, SG-LoRA writes an adapter nearer
    to that member than to the others."""
    settings, reg = toy_registry
    gen, data, _ = _fit("sg-lora", settings, reg, cvae={"steps": 600}, sample_scale=0.0)
    desc, _ = TOY_TASKS["music"]
    v = data.layout.flatten(gen.generate(Query(desc), seed=0).adapter)
    finals = {a: data.vectors[i] for i, (a, s) in enumerate(data.sources) if s < 0}
    dist = {a: float((v - f).norm()) for a, f in finals.items()}
    assert min(dist, key=dist.get) == "music-lora", dist
