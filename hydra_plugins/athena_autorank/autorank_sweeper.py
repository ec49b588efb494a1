"""`hydra/sweeper=autorank`: AutoRank as a Hydra sweeper. Each trial is an ordinary pretrain.py job (its own run
folder, config.json, metrics, eval) with one more override, `adapter.rank_pattern={...}`; the value it returns (the
run's eval score, what pretrain.py's main returns) goes back to the search, which proposes the next patterns.

    python pretrain.py -m --config-dir sweeps --config-name autorank          # sweeps/autorank.yaml

Why a sweeper of our own: hydra-optuna-sweeper 1.3 pins optuna < 3 (TPE only: no GP, and budget constraints only as
penalties), while a sweeper is a small interface (setup + sweep) through which each trial stays a normal job run
by Hydra's launcher (so `hydra/launcher=joblib` or a cluster launcher runs a batch of `q` trials at once) and the
search itself is athena.adapters.autorank, the same code as the Python API.

Before the first trial the sweeper composes one trial's config, builds its model (no weights trained) and reads
the adapter targets from it: the search space is exactly what the jobs will adapt. Trials go to
<sweep dir>/trial_NNN; <sweep dir>/autorank_trials.jsonl holds every finished trial, so the same command with
`hydra.sweep.dir=<that folder>` resumes the search without repeating a trial. A failed job is stored as failed and
the search goes on; if every trial so far failed, the sweep stops with the first one's error.

Only hydra is imported at module level: Hydra imports every plugin module on each start, `--help` included.
"""

# No `from __future__ import annotations`: Hydra executes this module before it is in sys.modules, and dataclasses
# then cannot resolve string annotations.

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

TRIALS_FILE = "autorank_trials.jsonl"
RESULT_FILE = "autorank_result.json"
SPACE_FILE = "autorank_space.json"


@dataclass
class AutoRankSweeperConf:
    _target_: str = "hydra_plugins.athena_autorank.autorank_sweeper.AutoRankSweeper"
    strategy: str = "gp"  # gp (AutoRank) | random (the baseline, same budget and trials)
    num_trials: int = 20
    rank_budget: Optional[int] = None  # total LoRA rank over every adapted module ...
    param_budget: Optional[int] = None  # ... or trainable LoRA parameters: exactly one of the two
    candidates: List[int] = field(default_factory=lambda: [0, 2, 4, 8, 16])  # 0: no adapter on that module
    direction: str = "minimize"  # of the trial's score (pretrain.py's return value): perplexity down, accuracy up
    n_initial: Optional[int] = None  # random trials before the GP; null: max(2, min(8, num_trials // 4))
    q: int = 1  # trials per batch handed to the launcher (run at once by a parallel launcher)
    patience: Optional[int] = None  # stop after this many trials without a better score
    seed: int = 0
    layers_per_slot: int = 1  # consecutive layers sharing one rank
    module_groups: Optional[Dict[str, List[str]]] = None  # {group: [module names]} sharing one rank per layer block
    trials_file: Optional[str] = None  # null: <sweep dir>/autorank_trials.jsonl
    params: Dict[str, str] = field(default_factory=dict)  # fixed overrides for every trial


ConfigStore.instance().store(group="hydra/sweeper", name="autorank", node=AutoRankSweeperConf, provider="athena")


class AutoRankSweeper(Sweeper):
    def __init__(self, **settings: Any):
        self.settings = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        self.params = self.settings.pop("params") or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> List[JobReturn]:
        from athena.cli import exit_with_error
        from athena.errors import AthenaError

        try:
            return self._sweep(arguments)
        except AthenaError as error:  # a bad setting or config: one line, as pretrain.py ends (athena.cli)
            exit_with_error(str(error))

    def _sweep(self, arguments: List[str]) -> List[JobReturn]:
        from athena.adapters.autorank import AutoRank, AutoRankError, RandomRankSearch

        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        s = self.settings
        fixed = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        swept = [o.input_line for o in parser.parse_overrides(fixed) if o.is_sweep_override()]
        if swept:
            raise AutoRankError(f"autorank: the sweeper chooses adapter.rank_pattern; give one value per key, not "
                                f"{swept[0]!r} (run one sweep per setting)")
        if s["strategy"] not in ("gp", "random"):
            raise AutoRankError(f"autorank: hydra.sweeper.strategy must be gp or random, got {s['strategy']!r}")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        space = self._space(fixed)
        (sweep_dir / SPACE_FILE).write_text(json.dumps(space.describe(), indent=1) + "\n")
        searcher = (AutoRank if s["strategy"] == "gp" else RandomRankSearch)(
            space=space, num_trials=s["num_trials"], direction=s["direction"], seed=s["seed"],
            n_initial=s["n_initial"], q=s["q"], patience=s["patience"],
            trials_file=s["trials_file"] or sweep_dir / TRIALS_FILE)
        if searcher.trials:
            log.info("autorank: resuming with %d stored trials from %s", len(searcher.trials), searcher.trials_file)
        log.info("autorank: %s, %s search of %d trials", space, s["strategy"], s["num_trials"])

        returns: list[JobReturn] = []
        first_failure: JobReturn | None = None
        number = _next_trial_number(sweep_dir)
        while not searcher.should_stop():
            proposals = searcher.ask(min(s["q"], s["num_trials"] - len(searcher.trials)))
            if not proposals:
                break  # every feasible pattern has been tried
            names = [f"trial_{number + i:03d}" for i in range(len(proposals))]
            batch = [[*fixed, f"adapter.rank_pattern={_as_override(space.rank_pattern(choice))}",
                      f"hydra.sweep.subdir={name}"] for (choice, _), name in zip(proposals, names)]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=number)
            number += len(batch)
            for proposal, name, result in zip(proposals, names, results):
                ok = result.status == JobStatus.COMPLETED
                value = _as_float(result.return_value) if ok else None
                first_failure = first_failure or (None if ok else result)
                searcher.tell(proposal, value, run_dir=str(sweep_dir / name), status="ok" if ok else "failed")
            returns += results
            if first_failure is not None and not any(t.ok for t in searcher.trials):
                break  # every trial so far failed: the config is broken, not the patterns
        if not any(t.ok for t in searcher.trials):
            if first_failure is not None:
                _ = first_failure.return_value  # raises the job's own error (pretrain.py: one line)
            raise AutoRankError(f"autorank: no trial finished with a finite score; see {sweep_dir}/trial_*/")
        best = searcher.best
        result = {"best_trial": best.number, "value": best.value, "direction": s["direction"],
                  "run_dir": best.info.get("run_dir"), "total_rank": best.total_rank,
                  "trainable_params": best.trainable_params, "budget": space.budget, "unit": space.unit,
                  "ranks": dict(zip((slot.name for slot in space.slots), best.choice)),
                  "rank_pattern": best.rank_pattern, "override": f"adapter.rank_pattern="
                                                                 f"{_as_override(best.rank_pattern)}",
                  "trials": len(searcher.trials), "strategy": s["strategy"]}
        (sweep_dir / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
        print(f"[athena] autorank: best of {len(searcher.trials)} trials is trial {best.number} "
              f"(score {best.value:.6g}, total rank {best.total_rank}, {best.trainable_params:,} LoRA parameters): "
              f"{sweep_dir / RESULT_FILE}")
        return returns

    def _space(self, fixed: list[str]):
        """The search space from one trial's model: compose, validate, build the data's metadata and the model."""
        from athena.adapters import AdapterConfig
        from athena.adapters.autorank import AutoRankError, RankSpace
        from athena.config import validate_config
        from athena.data.build import ensure_dataset
        from athena.data.format import PuzzleDataset
        from athena.models.build import build_model

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(fixed))
        with open_dict(cfg):
            del cfg["hydra"]
        run = validate_config(OmegaConf.to_container(cfg, resolve=True))
        if run.adapter.name == "none":
            raise AutoRankError("autorank: the trials have no adapter; add adapter=lora (its ranks are searched)")
        adapter = AdapterConfig(**run.adapter.adapter_kwargs())
        metadata = PuzzleDataset(ensure_dataset(run.dataset_dir(), dict(run.data.build)), "train").metadata
        model = build_model(run, metadata)
        s = self.settings
        return RankSpace.from_model(model, candidates=s["candidates"], rank_budget=s["rank_budget"],
                                    param_budget=s["param_budget"], adapter_config=adapter,
                                    layers_per_slot=s["layers_per_slot"], module_groups=s["module_groups"])


def _as_override(pattern: dict[str, int]) -> str:
    """{'model\\.layers\\.0\\.q_proj': 4} -> `{model\\.layers\\.0\\.q_proj:4}` (Hydra's grammar takes these keys
    unquoted, backslashes as they are)."""
    return "{" + ",".join(f"{key}:{rank}" for key, rank in pattern.items()) + "}"


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # a task function that returns nothing: stored as failed


def _next_trial_number(sweep_dir: Path) -> int:
    """After the highest trial_NNN folder: an interrupted trial's folder is kept, its pattern runs in a new one."""
    numbers = [int(p.name[6:]) for p in sweep_dir.glob("trial_*") if p.name[6:].isdigit()]
    return max(numbers, default=-1) + 1
