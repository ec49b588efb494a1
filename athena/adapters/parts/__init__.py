"""The parts a PolyAdapter composes: IA3 (ia3.py), LoRA (lora.py) and routed LoRA experts (experts.py).

A part is a small strategy over one wrapper, the shape of peft's LoRA variants: class attributes say what it is,
static methods take the wrapper and do the part's work.

    name        "ia3" | "lora" | "experts"
    switch      the wrapper attribute that turns it on and off at run time ("use_ia3", "use_lora", "use_moe")
    tensors     the wrapper attributes it owns (None on a wrapper built without it)
    mergeable   whether merge can fold it into the base weight
    build(layer, **factory_kwargs)   create its tensors on the wrapper, from the wrapper's hyperparameters
    describe(layer) -> str           for the wrapper's repr
  IA3, the output scale:   base_output(layer, x2) -> the base output, scaled
  LoRA and experts, deltas: weight_dtype(layer), add_delta(layer, xa, out) -> out plus the part's delta
  mergeable parts:          merge(layer, w, bias) / unmerge(layer, w, bias) on the float32 (out, in) weight

The tensors live on the wrapper itself, not in a submodule per part, so the state-dict keys stay peft's
(`<path>.lora_A.weight`, `<path>.ia3_l`): peft loads Athena's LoRA/IA3 files and earlier checkpoints still load.
"""
