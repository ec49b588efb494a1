"""The fast paths compute the same function as the plain ones: bf16 autocast vs fp32.

Compiled vs eager is in test_compile.py, the foreach optimizer update vs its reference in test_optimizers.py."""

import pytest
import torch

from tests.test_model_trm import make_batch, small_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_bf16_autocast_tracks_fp32_within_tolerance(mixer):
    """bf16 autocast (the GPU default) is the same function up to rounding, which the 14 recursive applications
    of the net amplify: loss within 2%, mean logit error under 3% of the logit scale, >= 90% of the (untrained,
    near-tied) cell predictions identical, and the same halting decisions."""
    model = small_model(mixer=mixer)
    batch = make_batch(8, seed=2)
    _, fp32 = model(model.initial_carry(batch), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = model(model.initial_carry(batch), batch)
    assert bf16.logits.dtype == torch.bfloat16
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.02 * abs(fp32.loss.item())
    error = (bf16.logits.float() - fp32.logits).abs().mean()
    assert error < 0.03 * fp32.logits.abs().max()
    assert (bf16.logits.argmax(-1) == fp32.logits.argmax(-1)).float().mean() >= 0.9
    assert torch.equal(bf16.q_halt_logits > 0, fp32.q_halt_logits > 0)
