"""CausalLMTask against Hugging Face's own causal-LM loss, and its global-batch normalisation: split into micro-batches
(as gradient accumulation and torchrun do) it gives the whole batch's mean loss and gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from athena.training.tasks import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH = 50, 12


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batches() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (6, LENGTH), generator=g)
    sft = inputs.clone()
    sft[:, :5] = -100  # the prompt: no loss there
    sft[0, 9:] = -100  # a short answer followed by padding
    return {"packed": {"inputs": inputs, "labels": inputs.clone()}, "sft": {"inputs": inputs, "labels": sft}}


@pytest.mark.parametrize("kind", ["packed", "sft"])
def test_loss_equals_hugging_face_causal_lm_loss(kind):
    model, batch = tiny_llama(), batches()[kind]
    task = CausalLMTask()
    task.setup(model, 1, torch.device("cpu"))
    task.begin_step(batch)
    loss, sums = task.step(model, 0, batch)
    expected = model(input_ids=batch["inputs"], labels=batch["labels"]).loss  # HF shifts and ignores -100 itself
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # float32 sums in another order
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert sums["tokens"].item() == labelled
    logged = task.summarise({k: v.item() for k, v in sums.items()}, n_steps=1, seconds=2.0)
    assert logged["train/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logged["train/tokens_per_s"] == labelled / 2.0


def test_micro_batches_give_the_global_batch_mean_and_gradient():
    """Answers of different lengths in different micro-batches: each micro-batch's sum is divided by the labelled
    tokens of the whole batch, so the summed losses and gradients are the whole batch's mean (a per-micro-batch mean
    would weigh the short answers' tokens more)."""
    batch = batches()["sft"]
    whole = tiny_llama()
    task = CausalLMTask()
    task.setup(whole, 1, torch.device("cpu"))
    task.begin_step(batch)
    loss_whole, _ = task.step(whole, 0, batch)
    loss_whole.backward()

    split = tiny_llama()
    task = CausalLMTask()
    task.setup(split, 2, torch.device("cpu"))
    task.begin_step(batch)
    total = 0.0
    for micro, part in enumerate(zip(*(v.chunk(2) for v in batch.values()))):
        loss, _ = task.step(split, micro, dict(zip(batch.keys(), part)))
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_whole.item(), rel=1e-6)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)  # float32, two-term sums
