"""Draws follow the generator's device, not the tensor's (a CPU generator with a CUDA model)."""

import torch

from effortless import _rng, likelihoods


def test_draws_happen_on_the_generator_and_land_on_the_tensors_device():
    # the meta device stands in for an accelerator: torch refuses a CPU generator for it directly
    like = torch.empty(0, device="meta", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    for fn in (_rng.randn, _rng.rand, _rng.signs):
        out = fn((3, 2), g, like)
        assert out.device.type == "meta" and out.shape == (3, 2) and out.dtype == torch.float64
    assert not torch.equal(g.get_state(), before)  # the numbers came from the CPU generator


def test_same_numbers_as_a_direct_draw_on_the_cpu():
    like = torch.empty(0, dtype=torch.float64)
    a = _rng.randn((4,), torch.Generator().manual_seed(3), like)
    b = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(a, b)
    s = _rng.signs((1000,), torch.Generator().manual_seed(3), like)
    assert set(s.unique().tolist()) == {-1.0, 1.0}


def test_likelihood_samples_with_a_generator_on_another_device():
    f = torch.zeros(5, 3, device="meta")
    for name in ("classification", "regression"):
        g = torch.Generator().manual_seed(0)
        before = g.get_state()
        assert likelihoods.get(name).sample(f, g).device.type == "meta"
        assert not torch.equal(g.get_state(), before)  # drawn from the CPU generator, then moved
