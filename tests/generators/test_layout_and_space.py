"""ParamLayout (adapter <-> vector) and ParamSpace (the basis built from the training vectors)."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import IncompatibleAdapter, IntegrityError
from loraplex.experts.spec import Adapter, LoraSpec
from loraplex.generators.layout import ParamLayout
from loraplex.generators.space import ParamSpace

MODS = {"enc.0.q": (4, 6, 5), "enc.0.v": (4, 6, 7), "enc.1.q": (2, 6, 5)}  # name: (rank, d_in, d_out)


def adapter(seed: int, mods=MODS) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    spec = LoraSpec(r=4, alpha=8, rank_pattern={"enc.1.q": 2})
    return Adapter(spec, {m: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for m, (r, i, o) in mods.items()})


def test_flatten_unflatten_is_exact_and_ordered():
    ad = adapter(0)
    lay = ParamLayout.of(ad)
    assert lay.size == sum(r * (i + o) for r, i, o in MODS.values()) and lay.modules == sorted(MODS)
    v = lay.flatten(ad)
    back = lay.unflatten(v)
    for m, (a, b) in ad.weights.items():
        assert torch.equal(back.weights[m][0], a) and torch.equal(back.weights[m][1], b)
    s = lay.slots[0]
    assert torch.equal(v[s.a_slice], ad.weights[s.name][0].reshape(-1))
    assert back.spec == ad.spec and back.rank("enc.1.q") == 2
    assert ParamLayout.from_json(lay.to_json()) == lay
    with pytest.raises(IncompatibleAdapter, match="does not fit this layout"):
        lay.unflatten(v[:-1])


@pytest.mark.parametrize("spec", [LoraSpec(r=4, alpha=64, rank_pattern={"enc.1.q": 2}),
                                  LoraSpec(r=4, alpha=8, use_rslora=True, rank_pattern={"enc.1.q": 2}),
                                  LoraSpec(r=4, alpha=8, rank_pattern={"enc.1.q": 2}, alpha_pattern={"enc.0.v": 2})])
def test_adapters_of_other_scalings_are_vectors_of_their_updates(spec):
    """A generator's vectors were raw A and B: members of another lora_alpha (or rsLoRA, an alpha_pattern) were
    mixed as if alike and written with the first member's scaling (sweep 28). Each vector is in the layout's
    scaling, so an adapter unflattened from it makes the update the member made."""
    lay = ParamLayout.of(adapter(0))
    other = Adapter(spec, adapter(1).weights)
    back = lay.unflatten(lay.flatten(other))
    for m, (a, b) in other.weights.items():
        want = other.scaling(m) * (b @ a)
        torch.testing.assert_close(back.scaling(m) * (back.weights[m][1] @ back.weights[m][0]), want)


@pytest.mark.parametrize("mods, message", [
    ({**MODS, "enc.0.v": (3, 6, 7)}, "at module 'enc.0.v': rank 3, 6 -> 7 features, where the layout has rank 4"),
    ({k: v for k, v in MODS.items() if k != "enc.0.v"}, "it has no module 'enc.0.v'"),
    ({**MODS, "enc.2.q": (4, 6, 5)}, "its module 'enc.2.q' is not in the layout"),
])
def test_another_layout_is_refused_naming_the_first_module(mods, message):
    lay = ParamLayout.of(adapter(0))
    with pytest.raises(IncompatibleAdapter, match=message):
        lay.flatten(adapter(1, mods), name="adapter 'odd'")


def test_space_spans_the_training_vectors_and_rebuilds_from_them():
    lay = ParamLayout.of(adapter(0))
    V = torch.stack([lay.flatten(adapter(s)) for s in range(6)])  # (6, P)
    sp = ParamSpace.fit(lay, V, energy=1.0)
    assert sp.dims == 5  # n - 1 directions after centring
    assert sp.fit_error(V) < 1e-5
    assert torch.allclose(sp.basis @ sp.basis.T, torch.eye(5, dtype=torch.float64), atol=1e-8)
    assert abs(float(sp.coords.pow(2).mean().sqrt()) - 1.0) < 1e-5  # unit RMS for the CVAE
    st = sp.state()
    again = ParamSpace.from_state(lay, V, st, where="g")
    assert torch.allclose(again.decode(sp.coords), V, atol=1e-5)
    with pytest.raises(IntegrityError, match="no longer give the coordinates"):
        ParamSpace.from_state(lay, V.flip(0), st, where="g")
    with pytest.raises(IntegrityError, match="fitted on 6 vectors, found 5"):
        ParamSpace.from_state(lay, V[:5], st, where="g")


def test_space_keeps_at_most_max_dims():
    lay = ParamLayout.of(adapter(0))
    V = torch.stack([lay.flatten(adapter(s)) for s in range(6)])
    sp = ParamSpace.fit(lay, V, max_dims=2)
    assert sp.dims == 2 and 0 < sp.fit_error(V) < 1


def test_a_fit_that_diverges_is_refused_not_stored():
    """A CVAE whose fit ends in NaN or infinity (a huge learning rate or KL weight) is refused with the options
    to lower; it used to be stored and then write adapters of NaN."""
    import pytest
    import torch

    from loraplex.errors import UserInputError
    from loraplex.generators.cvae import CVAE, CVAEConfig, fit_cvae

    cfg = CVAEConfig(steps=3, lr=10, kl_weight=1000)
    n, m, d = 4, 3, 5
    g = torch.Generator().manual_seed(0)
    x, rep, w, prog = torch.randn(n, m, generator=g), torch.randn(n, d, generator=g), torch.rand(n, n, generator=g), torch.ones(n)
    model = CVAE(m, d, n, cfg)
    with torch.no_grad():
        model.decoder[-1].weight.fill_(float("inf"))
    with pytest.raises(UserInputError, match="fit diverged .* lower them; nothing was stored"):
        fit_cvae(model, x, (rep, w, prog), cfg, progress=False)
