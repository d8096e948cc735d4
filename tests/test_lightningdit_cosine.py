"""The transport objective's velocity-direction term (``cos_loss``) against LightningDiT's own ``training_losses``
(tests/fixtures/lightningdit_cosine.pt, made by tests/fixtures/make_lightningdit_cosine.py from the unmodified
code; see tests/fixtures/README.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion.objectives.transport import build_transport
from tests.helpers import load_fixture


@pytest.fixture(scope="module")
def lightning():
    return load_fixture("lightningdit_cosine")


def _model(weights: dict, seen: dict):
    """The fixture's network v(x, t, y) = W x + b + t a + E[y] (its generator's ``tiny_model``), recording its
    inputs."""
    def model(x, t, y=None):
        seen["x_t"], seen["t"] = x, t
        extra = (1,) * (x.ndim - 2)
        out = torch.einsum("oc,bc...->bo...", weights["W"], x)
        out = out + weights["b"].view(1, -1, *extra) + t.view(-1, 1, *extra) * weights["a"].view(1, -1, *extra)
        return out + weights["E"][y].view(x.shape[0], -1, *extra)
    return model


@pytest.mark.parametrize("i", range(2), ids=["lognorm", "uniform"])
def test_cos_loss_matches_lightningdit(lightning, i):
    """LightningDiT's train.py minimises ``cos_loss.mean() + loss.mean()``: ours with ``cos_loss=1`` gives per
    sample its ``loss + cos_loss`` (the MSE plus the mean over positions of 1 - the channel cosine), on the same
    x_t (t = 0 noise, t = 1 data in both), from the same noise and times."""
    case = lightning["cases"][i]
    seen = {}
    out = build_transport("linear", "velocity", cos_loss=1.0).training_losses(
        _model(case["weights"], seen), case["x1"], {"y": case["y"]}, t=case["t"], noise=case["x0"])
    torch.testing.assert_close(seen["t"], case["t"], rtol=0, atol=0)
    torch.testing.assert_close(seen["x_t"], case["x_t"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["pred"], case["pred"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["loss"], case["loss"] + case["cos_loss"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["loss"].mean(), case["total"], rtol=0, atol=1e-6)
    without = build_transport("linear", "velocity").training_losses(
        _model(case["weights"], {}), case["x1"], {"y": case["y"]}, t=case["t"], noise=case["x0"])["loss"]
    torch.testing.assert_close(without, case["loss"], rtol=0, atol=1e-6)
    # one cosine of the flattened sample would miss the reference by far more than the tolerance
    flat = 1 - F.cosine_similarity(case["pred"].flatten(1), (case["x1"] - case["x0"]).flatten(1), dim=1)
    assert (flat - case["cos_loss"]).abs().max() > 1e-2


def test_cos_loss_weight_scales_the_term(lightning):
    case = lightning["cases"][0]
    out = build_transport(cos_loss=0.25).training_losses(_model(case["weights"], {}), case["x1"],
                                                         {"y": case["y"]}, t=case["t"], noise=case["x0"])["loss"]
    torch.testing.assert_close(out, case["loss"] + 0.25 * case["cos_loss"], rtol=0, atol=1e-6)
