"""Save / load only the adapter: `adapter_config.json` + `adapter_model.safetensors`.

Two formats, picked automatically:
- peft format, for a pure LoRA or pure IA3 adapter: keys `base_model.model.<path>.lora_A.weight` /
  `.lora_B.weight` / `.ia3_l` (shape (out, 1)) and a LoraConfig / IA3Config json, so that
  `peft.PeftModel.from_pretrained(model, dir)` loads it. target_modules lists the exact module paths, which
  also carries layers_to_skip; per-module ranks go to rank_pattern.
- Athena format for everything else (IA3+LoRA, experts, bottlenecks): the AdapterConfig under
  "athena_config" and the adapter tensors under the model's own state-dict names.
load_adapter reads both (and LoRA / IA3 adapters written by peft itself). On a model without adapters it
first adds them as the file describes; on a model that has them it only loads the tensors.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from athena.adapters.base import AdapterLayer, adapter_layers, adapter_parameters, has_adapters
from athena.adapters.config import AdapterConfig, AdapterConfigError
from athena.adapters.inject import add_adapters

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under the model's state-dict names (a shared bottleneck appears under every path)."""
    ids = {id(p) for p in adapter_parameters(model)}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def _peft_kind(model: nn.Module) -> str | None:
    """'lora' or 'ia3' when every adapter layer holds exactly that one part (what peft can represent), else None."""
    kinds = {layer.part_names for layer in adapter_layers(model)}
    if kinds == {("lora",)}:
        return "lora"
    if kinds == {("ia3",)}:
        return "ia3"
    return None


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    config: AdapterConfig | None = getattr(model, "adapter_config", None)
    if config is None or not has_adapters(model):
        raise AdapterConfigError("save_adapter: this model has no adapters; add them with add_adapters first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    kind = _peft_kind(model)
    if kind is None:
        meta = {"athena_format": 1, "athena_config": config.to_dict()}
        tensors = state
    else:
        meta, tensors = _to_peft(model, config, state, kind)
    # clone: safetensors refuses tensors sharing storage (shared bottlenecks, views)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def _to_peft(model, config, state, kind):
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}  # PolyAdapters: lora or ia3 only
    paths = sorted(wrapped)
    fan_in_fan_out = any(m.fan_in_fan_out for m in wrapped.values())
    common = dict(task_type=None, target_modules=paths, fan_in_fan_out=fan_in_fan_out, modules_to_save=None,
                  inference_mode=True, base_model_name_or_path=None, revision=None)
    if kind == "lora":
        ranks = {n: m.rank for n, m in wrapped.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        meta = dict(common, peft_type="LORA", r=r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                    bias="none", use_rslora=config.use_rslora, init_lora_weights=True, use_dora=False,
                    layers_to_transform=None, layers_pattern=None,
                    rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r}, alpha_pattern={})
        tensors = {PEFT_PREFIX + k: v for k, v in state.items()}
    else:
        meta = dict(common, peft_type="IA3", feedforward_modules=[], init_ia3_weights=True)
        tensors = {PEFT_PREFIX + k: v.reshape(-1, 1) for k, v in state.items()}  # peft: (out, 1)
    return meta, tensors


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterConfigError(f"load_adapter: {directory} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = json.loads(cfg_path.read_text())
    tensors = load_file(str(w_path))
    if "athena_config" in meta:
        config = AdapterConfig.from_dict(meta["athena_config"])
    elif meta.get("peft_type") in ("LORA", "IA3"):
        config, tensors = _from_peft(meta, tensors)
    else:
        raise AdapterConfigError(f"load_adapter: {cfg_path} is neither an Athena adapter nor a peft LoRA/IA3 "
                                 f"adapter (peft_type={meta.get('peft_type')!r})")
    if not has_adapters(model):
        add_adapters(model, config)
    _copy_in(model, tensors, directory)
    return model


def _from_peft(meta: dict, tensors: dict[str, torch.Tensor]):
    kind = meta["peft_type"]
    if any(not k.startswith(PEFT_PREFIX) for k in tensors):
        raise AdapterConfigError(f"load_adapter: peft keys must start with {PEFT_PREFIX!r}, got e.g. {next(iter(tensors))!r}")
    tensors = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}
    if kind == "LORA":
        unsupported = [k for k in tensors if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
        if unsupported or meta.get("use_dora") or meta.get("bias", "none") != "none" or meta.get("alpha_pattern"):
            raise AdapterConfigError(
                f"load_adapter: only plain LoRA on linear layers is supported (no DoRA, bias, alpha_pattern, "
                f"embeddings or modules_to_save); found e.g. {unsupported[:3] or 'an unsupported option'}")
        paths = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
        ranks = {p: tensors[p + ".lora_A.weight"].shape[0] for p in paths}
        r = int(meta.get("r", Counter(ranks.values()).most_common(1)[0][0]))
        config = AdapterConfig(
            method="lora", rank=r, alpha=float(meta.get("lora_alpha", r)), dropout=float(meta.get("lora_dropout", 0.0)),
            use_rslora=bool(meta.get("use_rslora", False)), target_modules=[re.escape(p) for p in paths],
            rank_pattern={re.escape(p): int(k) for p, k in ranks.items() if k != r})
    else:
        if meta.get("feedforward_modules"):
            raise AdapterConfigError(
                "load_adapter: this IA3 adapter scales the inputs of feedforward_modules "
                f"{meta['feedforward_modules']}; Athena's IA3 scales outputs only, so it cannot load it")
        paths = sorted(k[: -len(".ia3_l")] for k in tensors if k.endswith(".ia3_l"))
        if len(paths) != len(tensors):
            raise AdapterConfigError("load_adapter: this IA3 adapter holds tensors other than ia3_l; not supported")
        config = AdapterConfig(method="ia3", target_modules=[re.escape(p) for p in paths])
        tensors = {k: v.reshape(-1) for k, v in tensors.items()}
    return config, tensors


def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterConfigError(
            f"load_adapter: {directory} does not fit this model's adapters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise AdapterConfigError(f"load_adapter: {k} has shape {tuple(t.shape)} in {directory}, "
                                         f"the model expects {tuple(own[k].shape)}")
            own[k].copy_(t.to(own[k].dtype))
