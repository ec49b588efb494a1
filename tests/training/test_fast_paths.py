"""The fast paths compute the same function as the plain ones: bf16 autocast vs fp32.

Compiled vs eager is in test_compile.py, the foreach optimizer update vs its reference in test_optimizers.py."""

import pytest
import torch

from helpers import make_batch, small_model


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


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_bf16_stream_tracks_fp32(mixer):
    """stream_dtype="autocast" keeps y, z and the residual stream in bf16 under autocast (as the official TRM does):
    the same function within the bf16 tolerance above, the carry comes back in bf16, gradients reach every
    parameter; without autocast the option changes nothing at all."""
    batch = make_batch(8, seed=2)
    ref, model = small_model(mixer=mixer, stream_dtype="float32"), small_model(mixer=mixer, stream_dtype="autocast")
    model.load_state_dict(ref.state_dict())
    _, fp32 = ref(ref.initial_carry(batch), batch)
    _, same = model(model.initial_carry(batch), batch)
    assert torch.equal(same.logits, fp32.logits)  # no autocast: identical
    with torch.autocast("cpu", dtype=torch.bfloat16):
        carry, bf16 = model(model.initial_carry(batch), batch)
        carry, _ = model(carry, batch)  # a carried-over (not fresh) step keeps the dtype
    assert carry.z_H.dtype == carry.z_L.dtype == torch.bfloat16
    # ... and from the start: the reset states and the input embedding are made in bf16, not cast from float32
    # copies (on the GPU the puzzle embedding's graph break kept those alive to the end of the forward).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_H, z_L, _, data = model.reset_slots(model.initial_carry(batch), batch, torch.bfloat16)
        x = model.embed_input(data["inputs"], data["puzzle_identifiers"], torch.bfloat16)
    assert z_H.dtype == z_L.dtype == x.dtype == torch.bfloat16
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.02 * abs(fp32.loss.item())
    assert (bf16.logits.float() - fp32.logits).abs().mean() < 0.03 * fp32.logits.abs().max()
    bf16.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.coalesce().values() if g.is_sparse else g).all() for g in grads)


def test_compiled_bf16_stream_saves_no_float32_stream():
    """The memory point of stream_dtype="autocast": compiled (as in training), the float32 option saves the
    residual stream (B, L, hidden) in float32 for backward; the bf16 stream saves none of it in float32."""
    batch = make_batch(8, seed=2)

    def float32_streams(stream_dtype):
        model = small_model(mixer="mlp", stream_dtype=stream_dtype)
        compiled = torch.compile(model)
        found = []

        def pack(t):
            stream = {(model.total_len, model.hidden_size), (model.hidden_size, model.total_len)}
            if t.dtype == torch.float32 and t.dim() == 3 and tuple(t.shape[1:]) in stream:
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            _, out = compiled(model.initial_carry(batch), batch)
        out.loss.backward()
        return found

    assert float32_streams("float32")
    assert not float32_streams("autocast")
