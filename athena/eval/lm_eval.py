"""lm-evaluation-harness in process on a run's model (evaluator=lm_eval).

    python evaluate.py checkpoint=outputs/.../last.pt evaluator=lm_eval 'evaluator.tasks=[fortune_topic,held_out]'

The model is the run's own (adapters, EMA weights, later exit gates applied), scored by lm-eval 0.4's HFLM with the
tokenizer its data was made with (<data dir>/tokenizer). A task is
- a local task: <data dir>/tasks/<name>.yaml, written with the dataset (multiple_choice, loglikelihood_rolling, ...,
  absolute `data_files`); only these are indexed when every task asked for is local (lm-eval's index of its ~15k
  installed tasks takes 16-40 s to build);
- any task installed with lm-eval (`lm-eval ls tasks`). Its dataset comes from the Hugging Face hub, which Athena
  keeps offline (athena.offline): it runs if the dataset is in the local datasets cache, else it stops with one
  line naming the dataset it could not reach.

Why HFLM and not an own `lm_eval.api.model.LM`: HFLM is what published lm-eval numbers come from (how contexts and
continuations are tokenized and split, rolling windows, batching by length); an own loglikelihood would be a second
implementation to keep equal to it. What HFLM does to a model it is handed is undone or prevented here: it calls
model.eval() (every module's mode is restored), model.tie_weights() (skipped: it re-ties by parameter name, which
adapters or FSDP may have changed; the model is already as trained), and simple_evaluate reseeds Python's, numpy's
and torch's global RNGs (their states are restored, so a periodic eval leaves training's random streams alone). A
model HFLM cannot take (one without a Hugging Face config; the exit-gate wrapper has one) plugs in by overriding
`LMEvalEvaluator.language_model` with an HFLM subclass or its own LM.

Under torchrun every process runs the whole evaluation (the forwards of an FSDP model need every rank; lm-eval's own
sharding needs accelerate's launcher), and rank 0's results are broadcast so all ranks report the same numbers.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from athena.errors import AthenaError
from athena.eval.evaluators import EvalContext, Evaluator
from athena.eval.perplexity import evaluation_mode
from athena.offline import hf_offline

# lm-eval's own notes about the way it is used here (a model object, metrics without explicit aggregation, num_fewshot
# given for a task that sets none)
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
                      "aggregation is not", "higher_is_better is not", "from None to 0")


class LMEvalError(AthenaError, ValueError):
    """A task that cannot be found or loaded, or a dataset without a tokenizer; the message says how to fix it."""


@dataclass
class LMEvalReport:
    results: dict[str, dict[str, float]]  # task -> metric -> value ("acc", "acc_norm", "word_perplexity", ...)
    higher_is_better: dict[str, dict[str, bool]]
    samples: dict[str, int]  # task -> documents scored
    num_fewshot: int | None
    first_task: str
    per_sample: dict[str, list[dict]] = field(default_factory=dict)  # with log_samples: each document's responses

    @property
    def score(self) -> float:
        """The one number a sweep compares runs by: the first task's first metric (acc for a multiple-choice task,
        higher is better; word_perplexity for a rolling log-likelihood task, lower is better)."""
        metrics = self.results.get(self.first_task) or {}
        return next(iter(metrics.values()), float("nan"))

    def scope(self) -> str:
        shots = "task's own" if self.num_fewshot is None else self.num_fewshot
        return f"n={sum(self.samples.values())}, {len(self.results)} task(s), {shots}-shot"

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}{task}/{name}": value for task, metrics in self.results.items()
               for name, value in metrics.items()}
        return {**out, f"{prefix}count": float(sum(self.samples.values()))}

    def summary(self) -> dict:
        out = {"tasks": self.results, "samples": self.samples, "higher_is_better": self.higher_is_better,
               "num_fewshot": self.num_fewshot}
        return {**out, "per_sample": self.per_sample} if self.per_sample else out

    def headline(self) -> str:
        return "; ".join(f"{task}: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
                         for task, metrics in self.results.items())

    def plots(self, folder, title: str, stem: str = "lm_eval") -> dict:
        return {}  # a few numbers per eval: metrics.jsonl and W&B plot them over steps


class LMEvalEvaluator(Evaluator):
    """lm-eval's tasks on the run's model.

    tasks: local task names (<data dir>/tasks/*.yaml), installed lm-eval task names, or paths of task YAML files.
    num_fewshot: examples in each prompt (None: each task's own setting). limit: documents per task (an int, or a
    fraction < 1), None: all. batch_size: sequences per forward. max_length: the longest context in tokens (None:
    the model's max_position_embeddings). log_samples: keep each document's log-likelihoods in the report."""

    def __init__(self, tasks: list[str] | str, num_fewshot: int | None = 0, limit: int | float | None = None,
                 batch_size: int = 16, max_length: int | None = None, log_samples: bool = False):
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not tasks or tasks == ["???"]:  # ???: conf/evaluator/lm_eval.yaml's tasks, not given
            raise LMEvalError("lm_eval: no tasks given: evaluator.tasks=[name,...] (the dataset's own are the "
                              "<data dir>/tasks/*.yaml files)")
        # an int: `auto` probes memory in each process, and the ranks of an FSDP model must run the same batches
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LMEvalError(f"lm_eval: batch_size must be an int >= 1, got {batch_size!r}")
        self.tasks, self.num_fewshot, self.limit = tasks, num_fewshot, limit
        self.batch_size, self.max_length, self.log_samples = batch_size, max_length, log_samples
        self._managers: dict[str, Any] = {}  # local tasks folder -> TaskManager (kept across periodic evals)

    def evaluate(self, ctx: EvalContext) -> LMEvalReport:
        hf_offline()
        import lm_eval
        from transformers import PreTrainedModel

        if type(self).language_model is LMEvalEvaluator.language_model and not hf_like(ctx.model, PreTrainedModel):
            raise LMEvalError(f"lm_eval scores Hugging Face causal LMs (arch=hf_causal_lm or smollm2); this model is a "
                              f"{type(ctx.model).__name__}")
        tokenizer = data_tokenizer(ctx.data_dir)
        manager = self.task_manager(ctx.data_dir / "tasks")
        with evaluation_mode(ctx.model), global_rng_kept(ctx.device), lm_eval_notes_hidden():
            lm = self.language_model(ctx, tokenizer)
            try:
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=list(self.tasks), num_fewshot=self.num_fewshot, limit=self.limit,
                    bootstrap_iters=0, task_manager=manager, log_samples=self.log_samples)
            except ConnectionError as error:  # an installed task whose dataset is not in the local cache
                raise LMEvalError(f"lm_eval: {error}: Athena runs the Hugging Face libraries offline; put the "
                                  "dataset in the local datasets cache (HF_DATASETS_CACHE) or evaluate a local task "
                                  f"of {ctx.data_dir / 'tasks'}") from None
        output = rank0_output(output)
        return self.report(output)

    def language_model(self, ctx: EvalContext, tokenizer):
        """The lm_eval LM that scores ctx.model: HFLM on the model object (override for models HFLM cannot take)."""
        from lm_eval.models.huggingface import HFLM

        model = ctx.model
        with tie_weights_skipped(model):
            return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length,
                        mixed_precision_dtype=autocast_dtype(ctx), softmax_dtype=torch.float32)

    def task_manager(self, local: Path):
        """lm-eval's task index: the local tasks alone when they hold every task asked for, else with the
        installed ones; an unknown task stops here with one line."""
        from lm_eval.tasks import TaskManager

        include = str(local) if local.is_dir() else None
        key = f"{include}|local"
        if key not in self._managers:
            self._managers[key] = TaskManager(include_path=include, include_defaults=False)
        manager = self._managers[key]
        local_names = set(manager.all_tasks) if include else set()
        missing = [task for task in self.tasks if task not in local_names and not Path(task).is_file()]
        if not missing:
            return manager
        key = f"{include}|installed"
        if key not in self._managers:
            self._managers[key] = TaskManager(include_path=include, include_defaults=True)
        manager = self._managers[key]
        unknown = [task for task in missing if task not in manager.all_tasks]
        if unknown:
            local_list = ", ".join(sorted(local_names)) or "none"
            raise LMEvalError(f"lm_eval: no task {unknown[0]!r}: the dataset's own tasks are {local_list} "
                              f"(in {local}); any task installed with lm-eval works too (`lm-eval ls tasks`)")
        return manager

    def report(self, output: dict) -> LMEvalReport:
        results, higher = {}, {}
        for task, values in output["results"].items():
            results[task], higher[task] = {}, {}
            better = output.get("higher_is_better", {}).get(task, {})
            for key, value in values.items():
                name, _, filtered = key.partition(",")
                if not filtered or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue  # alias, sample_len, stderrs ("N/A" without bootstrap)
                name = name if filtered == "none" else f"{name}/{filtered}"
                results[task][name] = float(value)
                if name.split("/")[0] in better:
                    higher[task][name] = bool(better[name.split("/")[0]])
        samples = {task: int(counts["effective"]) for task, counts in output.get("n-samples", {}).items()}
        per_sample = {task: [sample_record(s) for s in items] for task, items in output.get("samples", {}).items()}
        return LMEvalReport(results=results, higher_is_better=higher, samples=samples, num_fewshot=self.num_fewshot,
                            first_task=self.tasks[0], per_sample=per_sample)


def hf_like(model, pretrained_model_class) -> bool:
    """A Hugging Face causal LM, or a wrapper that offers what HFLM reads of one (a Hugging Face `config`, `device`,
    `tie_weights`, logits from `model(ids)`): athena.adaptive's HierarchicalAdaptiveWrapper."""
    from transformers import PretrainedConfig

    return isinstance(model, pretrained_model_class) or (
        isinstance(getattr(model, "config", None), PretrainedConfig) and hasattr(model, "tie_weights"))


def data_tokenizer(data_dir: Path):
    """The tokenizer the dataset's token ids come from (<data dir>/tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(data_dir) / "tokenizer"
    if not folder.is_dir():
        raise LMEvalError(f"lm_eval: no tokenizer in {folder}: lm-eval needs a text dataset (e.g. data=text), which "
                          "saves the tokenizer its ids come from")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def autocast_dtype(ctx: EvalContext) -> torch.dtype | None:
    """The dtype ctx.autocast runs forwards in (None: no autocast). HFLM opens its own autocast around each forward,
    disabled unless given a dtype, which would switch an outer one off: so it is told the run's."""
    with ctx.autocast():
        if torch.is_autocast_enabled(ctx.device.type):
            return torch.get_autocast_dtype(ctx.device.type)
    return None


@contextmanager
def tie_weights_skipped(model: torch.nn.Module):
    """HFLM calls model.tie_weights(), which re-ties parameters by name: a no-op on the model as built, but adapters
    or FSDP may have replaced what those names point to. The model evaluated is the model trained, untouched."""
    model.tie_weights = lambda *args, **kwargs: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.tie_weights


@contextmanager
def global_rng_kept(device: torch.device):
    """simple_evaluate seeds Python's, numpy's and torch's global generators: put their states back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _DropExpectedNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in _EXPECTED_WARNINGS)


@contextmanager
def lm_eval_notes_hidden():
    """lm-eval logs every step at INFO and warns about how it is used here; keep its other warnings. (A filter on
    a logger sees only the records made there, so it goes on each of lm-eval's module loggers.)"""
    import lm_eval.api.task  # noqa: F401  (the modules that warn, so that their loggers exist)
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401

    root = logging.getLogger("lm_eval")
    level, note_filter = root.level, _DropExpectedNotes()
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "lm_eval" or name.startswith("lm_eval.")]
    root.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addFilter(note_filter)
    try:
        yield
    finally:
        root.setLevel(level)
        for logger in loggers:
            logger.removeFilter(note_filter)


def rank0_output(output: dict | None) -> dict:
    """simple_evaluate returns results only where LOCAL_RANK is 0: every rank gets rank 0's."""
    if dist.is_available() and dist.is_initialized():
        box = [output if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        output = box[0]
    return output


def sample_record(sample: dict) -> dict:
    """One document of log_samples, JSON-ready: its id, target, responses (a log-likelihood and is-greedy per choice
    of a multiple_choice task, the total log-likelihood of a rolling one) and its metric values."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (np.generic, torch.Tensor)):
            return value.item()
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    metrics = {k: plain(v) for k, v in sample.items() if k in sample.get("metrics", [])}
    return {"doc_id": sample["doc_id"], "target": plain(sample.get("target")),
            "responses": plain(sample.get("filtered_resps")), **metrics}

