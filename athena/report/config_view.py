"""A run's config as a reader wants it: one line per part (arch, data, adapter, task, evaluator, training) and the
keys that differ from the defaults conf/ composes today."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from athena.errors import AthenaError
from athena.report.runs import Run, flatten, is_number

# Hyperparameters that say what a model is, in this order, where an arch node has them; others are in config.json.
ARCH_KEYS = ("pretrained", "path", "name_or_path", "hidden_size", "num_layers", "num_hidden_layers", "num_heads",
             "num_attention_heads", "num_key_value_heads", "intermediate_size", "expansion", "H_cycles", "L_cycles",
             "halt_max_steps", "mixer", "seq_len")
# Keys that differ between machines, not between experiments.
MACHINE_KEYS = ("data_root",)


def short(value: Any, width: int = 80) -> str:
    """A config value in one line: null for None, JSON for lists and dicts, cut at `width` characters."""
    if value is None:
        text = "null"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def target_name(node: Any) -> str:
    """`athena.eval.evaluators.PuzzleEvaluator` -> `PuzzleEvaluator`."""
    target = node.get("_target_", "") if isinstance(node, dict) else ""
    return str(target).rsplit(".", 1)[-1] if target else "?"


def kwargs_of(node: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    items = [f"{k} {short(v, 40)}" for k, v in node.items()
             if not k.startswith("_") and k not in skip and v is not None]
    return ", ".join(items)


def key_config(run: Run) -> list[tuple[str, str]]:
    """(part, one line) rows for report.md; parts the config does not have are left out."""
    cfg = run.config
    rows = []
    arch = cfg.get("arch")
    if isinstance(arch, dict):
        shown = ", ".join(f"{k} {short(arch[k], 40)}" for k in ARCH_KEYS if k in arch)
        line = f"`{target_name(arch)}`" + (f": {shown}" if shown else "")
        size = run.log_match(r"model \S+ with ([\d.]+[KMB]?) parameters")
        rows.append(("arch", line + (f"; {size.group(1)} parameters" if size else "")))
    data = cfg.get("data")
    if isinstance(data, dict):
        built = run.log_match(r"data \S+: (.*?) \(")
        build = data.get("build") or {}
        line = f"{data.get('name', '?')}" + (f": {built.group(1)}" if built else "")
        rows.append(("data", line + f" (`{target_name(build)}`: {kwargs_of(build)})"))
    adapter = cfg.get("adapter")
    if isinstance(adapter, dict):
        rows.append(("adapter", _adapter_line(adapter)))
    for part in ("task", "evaluator"):
        node = cfg.get(part)
        if isinstance(node, dict):
            extra = kwargs_of(node)
            rows.append((part, f"`{target_name(node)}`" + (f" ({extra})" if extra else "")))
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, dict):
        model = optimizer.get("model") or {}
        rows.append(("optimizer", f"{optimizer.get('name', target_name(model))} ({kwargs_of(model, skip=('lr',))})"))
    train = cfg.get("train")
    if isinstance(train, dict):
        rows.append(("training", _training_line(train)))
    params = run.trainable_params
    if params:
        trainable, total = params
        rows.append(("trainable parameters", f"{trainable:,}" + (f" of {total:,} ({100 * trainable / total:.3f}%)"
                                                                   if total else "")))
    device = run.log_match(r"device (\S+ \(\w+\))")
    if device:
        rows.append(("device", device.group(1)))
    for part in ("freezing", "rehearsal", "exit"):
        node = cfg.get(part)
        if isinstance(node, dict) and node.get("name", "none") != "none":
            rows.append((part, f"{node['name']} ({kwargs_of(node, skip=('name',))})"))
    for part in ("callbacks", "model_transforms"):
        if cfg.get(part):
            rows.append((part, ", ".join(f"`{target_name(node)}`" for node in cfg[part])))
    for key in ("init_from", "resume"):
        if cfg.get(key) not in (None, "none"):
            rows.append((key, f"`{cfg[key]}`"))
    if "seed" in cfg:
        rows.append(("seed", str(cfg["seed"])))
    return rows


def _adapter_line(adapter: dict[str, Any]) -> str:
    name = adapter.get("name", "?")
    if name == "none":
        return "none (every parameter trains)"
    defaults = (default_config() or {}).get("adapter", {})
    changed = {k: v for k, v in adapter.items() if k not in ("name", "rank", "alpha") and defaults.get(k, v) != v}
    parts = [f"rank {adapter.get('rank')}", f"alpha {short(adapter.get('alpha'))}"]
    parts += [f"{k} {short(v, 40)}" for k, v in changed.items()]
    return f"{name} ({', '.join(parts)})"


def _training_line(train: dict[str, Any]) -> str:
    length = f"{train['steps']} steps" if train.get("steps") else f"{train.get('epochs')} epochs"
    parts = [length, f"global batch {train.get('global_batch_size')}"]
    if is_number(train.get("lr")):
        schedule = ", ".join(x for x in (train.get("lr_schedule"),
                                         f"{train['lr_warmup_steps']} warm-up steps" if train.get("lr_warmup_steps")
                                         else None) if x)
        parts.append(f"lr {train['lr']:g}" + (f" ({schedule})" if schedule else ""))
    if (train.get("grad_accum_steps") or 1) > 1:
        parts.append(f"{train['grad_accum_steps']} accumulation steps")
    for key, label in (("precision", "precision"), ("ema_decay", "EMA"), ("grad_clip", "grad clip"),
                       ("parallel", "parallel")):
        if train.get(key) is not None:
            parts.append(f"{label} {short(train[key])}")
    if train.get("compile"):
        parts.append(f"compiled ({train.get('compile_mode')})")
    return ", ".join(parts)


@lru_cache(maxsize=1)
def default_config() -> dict[str, Any] | None:
    """The resolved config of `python pretrain.py` with no overrides, as this code's conf/ composes it (None where it
    does not compose, e.g. a checkout without conf/)."""
    from athena.config import compose_config, validate_config

    try:
        return validate_config(compose_config([])).resolved()
    except (AthenaError, ImportError, ValueError, OSError) as error:  # hydra's and omegaconf's errors are ValueErrors
        _default_error.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


_default_error: list[str] = []


def differences(config: dict[str, Any]) -> list[tuple[str, str, str]] | str:
    """(dotted key, default, this run) for each key whose value differs from today's defaults, or why that cannot be
    told. Keys of one run only (a task's own knobs) count as differences with default `-`."""
    defaults = default_config()
    if defaults is None:
        return f"the defaults do not compose here ({_default_error[-1] if _default_error else 'unknown reason'})"
    ours, base = flatten(config, sep="."), flatten(defaults, sep=".")
    rows = []
    for key in sorted(set(ours) | set(base)):
        if key.split(".")[0] in MACHINE_KEYS or ours.get(key, _MISSING) == base.get(key, _MISSING):
            continue
        rows.append((key, _shown(base.get(key, _MISSING)), _shown(ours.get(key, _MISSING))))
    return rows


_MISSING = object()


def _shown(value: Any) -> str:
    return "-" if value is _MISSING else short(value, 60)
