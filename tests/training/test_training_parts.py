"""Schedule and EMA: small pieces whose numbers must be exactly right."""

from __future__ import annotations

import math

import pytest
import torch

from athena.training.ema import ModelEMA
from athena.training.schedule import lr_multiplier


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=10, total_steps=110, kind="cosine", min_ratio=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(10, **kw) == 1.0  # the first step after warm-up is the peak, not above it
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)  # past total_steps (a run extended on resume): the floor
    assert lr_multiplier(500, **{**kw, "kind": "constant"}) == 1.0


def test_ema_tracks_reference_and_swaps_back():
    layer = torch.nn.Linear(3, 2)
    ema = ModelEMA(dict(layer.named_parameters()), decay=0.9)
    reference = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        ema.update()
        for n, p in layer.named_parameters():
            reference[n] = 0.9 * reference[n] + 0.1 * p.detach()
    raw = layer.weight.detach().clone()
    with ema.applied():
        assert torch.allclose(layer.weight, reference["weight"])
    assert torch.equal(layer.weight, raw)


def test_ema_state_round_trips_into_a_fresh_ema():
    """Resume restores the EMA through load_state_dict: a fresh EMA given the saved state holds and applies the same
    weights; a state for other parameters is refused."""
    layer = torch.nn.Linear(3, 2)
    ema = ModelEMA(dict(layer.named_parameters()), decay=0.5)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    saved = ema.state_dict()
    fresh = ModelEMA(dict(layer.named_parameters()), decay=0.5)  # its shadow starts at the current weights
    assert not torch.equal(fresh.shadow["weight"], saved["weight"])
    fresh.load_state_dict(saved)
    with fresh.applied():
        assert torch.equal(layer.weight, saved["weight"]) and torch.equal(layer.bias, saved["bias"])
    with pytest.raises(KeyError, match="EMA state does not match the model"):
        fresh.load_state_dict({"weight": saved["weight"]})


def test_data_loaders_leave_the_global_rng_alone(tmp_path, data_root):
    """Halting exploration draws from the global torch RNG, which checkpoints save and restore. Creating a data
    iterator must not draw from it (DataLoader does by default): a resumed run creates its iterator after the
    restore, and periodic evals create theirs mid-run, which would shift the stream and break exact resume."""
    from helpers import composed

    from athena.config import validate_config
    from athena.training.recipe import PretrainRecipe

    config = composed("experiment=smoke", f"data_root={data_root}", "device=cpu")
    recipe = PretrainRecipe(validate_config(config), tmp_path)
    recipe.setup()
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        next(iter(recipe.train_loader))
        next(iter(recipe.eval_loader(max_examples=8)))
        assert torch.equal(torch.rand(3), expected)
    finally:
        recipe.close()
