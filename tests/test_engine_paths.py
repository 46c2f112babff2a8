"""Every fast path of the engine has an eager twin: compiled step, autocast."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, random_batch

from advtrain.attacks import PGD
from advtrain.engine.loop import ascent_step
from advtrain.maximizers import PGD as PGDMaximizer
from advtrain.threat import geometry_for


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ascent_step_is_the_projected_steepest_step(norm):
    geo = geometry_for(norm)
    x, _ = random_batch(8)
    delta, grad = torch.randn_like(x) * 0.05, torch.randn_like(x)
    alpha, eps = torch.full((8,), 0.02), torch.full((8,), 0.1)
    expected = geo.project_ball_box(x, delta + 0.02 * geo.ascent_direction(grad), eps)
    torch.testing.assert_close(ascent_step(geo, x, delta, grad, alpha, eps), expected)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compiled_step_matches_eager(norm):
    model = TinyCNN().eval()
    x, y = random_batch(8)
    eager = PGD(norm=norm, eps=0.1, steps=5, seed=0)(model, x, y)
    compiled = PGD(norm=norm, eps=0.1, steps=5, seed=0, compile=True)(model, x, y)
    torch.testing.assert_close(compiled.adv, eager.adv, atol=1e-6, rtol=0)
    assert torch.equal(compiled.success, eager.success)
    assert compiled.backward_passes == eager.backward_passes


def test_bf16_autocast_keeps_perturbation_in_float32_and_inside_the_ball():
    model = TinyCNN().eval()
    x, y = random_batch(8)
    result = PGD(eps=0.1, steps=4, seed=0, autocast="bf16")(model, x, y)
    assert result.adv.dtype == torch.float32
    assert (result.adv - x).abs().max() <= 0.1 + 1e-6
    pert = PGDMaximizer(eps=0.1, steps=3, autocast="bf16")(model, x, y)
    assert pert.adv.dtype == torch.float32 and (pert.adv - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="Unknown autocast"):
        PGD(eps=0.1, autocast="fp8")


def test_a_model_returning_probabilities_is_detected_with_a_warning():
    """Softmax outputs instead of logits are gradient masking waiting to happen: the core warns, naming the fix;
    a normal classifier does not trigger it."""
    import warnings

    from advtrain.engine.checks import ProbabilitiesWarning

    torch.manual_seed(0)
    base = TinyCNN().eval()
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    probs = torch.nn.Sequential(base, torch.nn.Softmax(dim=1))
    with pytest.warns(ProbabilitiesWarning, match="Remove the final softmax"):
        PGD(eps=0.1, steps=2, seed=0)(probs, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbabilitiesWarning)
        PGD(eps=0.1, steps=2, seed=0)(base, x, y)
