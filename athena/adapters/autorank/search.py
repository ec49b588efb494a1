"""AutoRank: Bayesian optimisation of per-module LoRA ranks under a budget, and random search with the same API.

    autorank = AutoRank(model=model, rank_budget=64, num_trials=20, direction="minimize")
    best = autorank.search(train_fn)          # train_fn(rank_pattern) -> validation loss of a short run
    add_adapters(model, AdapterConfig(method="lora", rank_pattern=best.rank_pattern))

Each round proposes `q` feasible choices (RankSpace): the first `n_initial` at random, then by a Gaussian process
(botorch's SingleTaskGP on the choices' positions in the candidate list, outcomes standardised) and batch log
expected improvement (qLogExpectedImprovement), maximised with optimize_acqf_discrete over a set of feasible
choices: the whole feasible set when it is small, else a fresh sample of it plus every neighbour of the best trials.
Picking from feasible choices keeps the budget exact, with no rounding or repair of a continuous optimum.

Every finished trial is appended to `trials_file` (JSON lines) at once; a search built with the same file and space
reloads them, never proposes a stored choice again and carries on to num_trials. `patience` stops a search whose
best has not improved for that many trials. A trial whose value is None, NaN or infinite counts as failed: stored,
never repeated, not fed to the GP. `ask`/`tell` are the same loop for callers that run trials themselves (the
Hydra sweeper, hydra_plugins/athena_autorank).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from concurrent.futures import Executor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from athena.adapters.autorank.space import DEFAULT_CANDIDATES, AutoRankError, Choice, RankSpace
from athena.adapters.config import AdapterConfig

Direction = Literal["minimize", "maximize"]


@dataclass
class Trial:
    number: int
    choice: Choice  # rank per slot
    value: float | None  # None: failed
    source: str  # initial | random | gp
    rank_pattern: dict[str, int]
    total_rank: int
    trainable_params: int
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the trial's run folder

    @property
    def ok(self) -> bool:
        return self.value is not None and math.isfinite(self.value)


class AutoRank:
    """GP search over per-module LoRA ranks. Give `model` (its adapter targets make the space: see
    RankSpace.from_model for adapter_config, layers_per_slot and module_groups) or a ready `space`.

    direction: whether train_fn's value is minimised (a loss) or maximised (an accuracy). n_initial: random trials
    before the GP (default: max(2, min(8, num_trials // 4))). q: trials proposed together (run at once through
    `executor`, e.g. a ThreadPoolExecutor with one worker per device). num_choices: size of the sampled feasible set
    the acquisition is maximised over when the whole set is larger."""

    strategy = "gp"

    def __init__(self, model: nn.Module | None = None, *, rank_budget: int | None = None,
                 param_budget: int | None = None, num_trials: int = 30, candidates: Iterable[int] = DEFAULT_CANDIDATES,
                 direction: Direction = "minimize", seed: int = 0, n_initial: int | None = None, q: int = 1,
                 patience: int | None = None, trials_file: str | Path | None = None,
                 adapter_config: AdapterConfig | dict | None = None, layers_per_slot: int = 1,
                 module_groups: dict[str, list[str]] | None = None, space: RankSpace | None = None,
                 num_choices: int = 2048, executor: Executor | None = None):
        if (model is None) == (space is None):
            raise AutoRankError("autorank: give a model (its adapter targets make the search space) or a space")
        if space is None:
            space = RankSpace.from_model(model, candidates=candidates, rank_budget=rank_budget,
                                         param_budget=param_budget, adapter_config=adapter_config,
                                         layers_per_slot=layers_per_slot, module_groups=module_groups)
        self.space = space
        for name, value, low in (("num_trials", num_trials, 1), ("q", q, 1), ("num_choices", num_choices, 1),
                                 ("n_initial", n_initial, 0), ("patience", patience, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise AutoRankError(f"autorank: {name} must be an int >= {low}, got {value!r}")
        if direction not in ("minimize", "maximize"):
            raise AutoRankError(f"autorank: direction must be 'minimize' or 'maximize', got {direction!r}")
        self.num_trials, self.q, self.num_choices, self.patience = num_trials, q, num_choices, patience
        self.n_initial = max(2, min(8, num_trials // 4)) if n_initial is None else n_initial
        self.direction, self.seed, self.executor = direction, seed, executor
        self.adapter_config = adapter_config
        self.trials_file = Path(trials_file) if trials_file is not None else None
        self.trials: list[Trial] = self._load() if self.trials_file is not None else []
        self._feasible_set: list[Choice] | None | bool = False  # False: not enumerated yet

    # ------------------------------------------------------------------ the loop
    def search(self, train_fn: Callable[[dict[str, int]], float]) -> Trial:
        """Run trials until num_trials are stored (resumed ones count), patience runs out or every feasible choice
        has been tried; returns the best trial. train_fn(rank_pattern) trains briefly and returns the value."""
        while not self.should_stop():
            batch = self.ask(min(self.q, self.num_trials - len(self.trials)))
            if not batch:
                break  # every feasible choice has been tried
            for choice, value, seconds in self._evaluate(train_fn, batch):
                self.tell(choice, value, seconds=seconds)
        return self.best

    def _evaluate(self, train_fn, batch: list[tuple[Choice, str]]):
        def run(choice: Choice):
            start = time.perf_counter()
            value = train_fn(self.space.rank_pattern(choice))
            return value, time.perf_counter() - start

        if self.executor is None or len(batch) == 1:
            for item in batch:  # each trial is stored as soon as it ends
                yield (item, *run(item[0]))
            return
        futures = {self.executor.submit(run, item[0]): item for item in batch}
        for future in as_completed(futures):
            yield (futures[future], *future.result())

    def should_stop(self) -> bool:
        if len(self.trials) >= self.num_trials:
            return True
        if self.patience is None or len(self.trials) < self.n_initial or not any(t.ok for t in self.trials):
            return False
        return len(self.trials) - 1 - self.best.number >= self.patience

    def ask(self, n: int = 1) -> list[tuple[Choice, str]]:
        """Up to n new feasible choices, each with where it came from (initial, random or gp); fewer when the
        feasible set runs out. Never a stored choice."""
        if n < 1:
            return []
        rng = random.Random(f"{self.seed}:{len(self.trials)}")  # the same proposals after a resume
        tried = {t.choice for t in self.trials}
        if self.strategy == "random":
            return [(c, "random") for c in self._random(n, tried, rng)]
        ok = [t for t in self.trials if t.ok]
        if len(self.trials) < self.n_initial or len(ok) < 2:
            return [(c, "initial") for c in self._random(n, tried, rng)]
        return [(c, "gp") for c in self._gp(n, ok, tried, rng)]

    def tell(self, proposal: Choice | tuple[Choice, str], value: float | None, seconds: float = 0.0,
             **info: Any) -> Trial:
        """Store one finished trial (appended to trials_file at once)."""
        choice, source = proposal if isinstance(proposal[-1], str) else (tuple(proposal), "given")
        choice = self.space.check(choice)
        if any(t.choice == choice for t in self.trials):
            raise AutoRankError(f"autorank: choice {list(choice)} was already tried")
        value = None if value is None or not math.isfinite(float(value)) else float(value)
        trial = Trial(len(self.trials), choice, value, source, self.space.rank_pattern(choice),
                      self.space.total_rank(choice), self.space.trainable_params(choice), seconds, info)
        self.trials.append(trial)
        if self.trials_file is not None:
            self.trials_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.trials_file, "a") as f:
                f.write(json.dumps(self._record(trial)) + "\n")
        return trial

    # ------------------------------------------------------------------ results
    @property
    def best(self) -> Trial:
        ok = [t for t in self.trials if t.ok]
        if not ok:
            raise AutoRankError("autorank: no trial has finished with a finite value yet")
        pick = min if self.direction == "minimize" else max
        return pick(ok, key=lambda t: (t.value, t.number) if self.direction == "minimize" else (t.value, -t.number))

    @property
    def best_rank_pattern(self) -> dict[str, int]:
        return self.best.rank_pattern

    def best_adapter_config(self) -> AdapterConfig:
        return self.space.adapter_config(self.best.choice, self.adapter_config)

    def best_so_far(self) -> list[float | None]:
        """After each trial, the best value so far (None before the first finished one)."""
        out, best = [], None
        for t in self.trials:
            if t.ok and (best is None or (t.value < best if self.direction == "minimize" else t.value > best)):
                best = t.value
            out.append(best)
        return out

    # ------------------------------------------------------------------ proposals
    def _feasible(self) -> list[Choice] | None:
        """The whole feasible set if it is small enough to enumerate (cached), else None."""
        if self._feasible_set is False:
            self._feasible_set = self.space.enumerate(limit=20_000)
        return self._feasible_set

    def _random(self, n: int, tried: set[Choice], rng: random.Random) -> list[Choice]:
        pool = self._feasible()
        if pool is not None:  # uniform over the feasible set, without repeats
            fresh = [c for c in pool if c not in tried]
            return rng.sample(fresh, min(n, len(fresh)))
        out: list[Choice] = []
        for _ in range(100):
            out += [c for c in dict.fromkeys(self.space.sample(4 * n, rng)) if c not in tried and c not in out]
            if len(out) >= n:
                break
        return out[:n]

    def _choices(self, ok: list[Trial], tried: set[Choice], rng: random.Random) -> list[Choice]:
        """What the acquisition picks from: the feasible set, or a sample of it plus the neighbours of the best
        trials (a GP on few points ranks the region around the incumbents best)."""
        pool = self._feasible()
        if pool is None or len(pool) > self.num_choices:
            ranked = sorted(ok, key=lambda t: t.value, reverse=self.direction == "maximize")
            near = [c for t in ranked[:5] for c in self.space.neighbours(t.choice)]
            sampled = rng.sample(pool, self.num_choices) if pool is not None else self.space.sample(self.num_choices,
                                                                                                    rng)
            pool = near + sampled
        return [c for c in dict.fromkeys(pool) if c not in tried]

    def _gp(self, n: int, ok: list[Trial], tried: set[Choice], rng: random.Random) -> list[Choice]:
        from botorch.acquisition.logei import qLogExpectedImprovement
        from botorch.exceptions import ModelFittingError
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Standardize
        from botorch.optim import optimize_acqf_discrete
        from botorch.sampling import SobolQMCNormalSampler
        from gpytorch.mlls import ExactMarginalLogLikelihood

        choices = self._choices(ok, tried, rng)
        if len(choices) <= n:
            return choices
        sign = 1.0 if self.direction == "maximize" else -1.0  # botorch maximises
        x = self.space.encode([t.choice for t in ok])
        y = torch.tensor([[sign * t.value] for t in ok], dtype=torch.double)
        with _one_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # botorch's notes on input scaling and fit retries: the inputs are [0,1]
            torch.manual_seed(rng.randrange(2**31))
            model = SingleTaskGP(x, y, outcome_transform=Standardize(m=1))
            try:
                fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
            except ModelFittingError:
                warnings.warn("autorank: the GP did not fit; this round's choices are random", stacklevel=2)
                return self._random(n, tried, rng)
            sampler = SobolQMCNormalSampler(sample_shape=torch.Size([256]), seed=rng.randrange(2**31))
            acquisition = qLogExpectedImprovement(model, best_f=y.max(), sampler=sampler)
            encoded = self.space.encode(choices)
            picked, _ = optimize_acqf_discrete(acquisition, q=n, choices=encoded, max_batch_size=1024, unique=True)
        index = {tuple(row.tolist()): c for row, c in zip(encoded, choices)}
        return [index[tuple(row.tolist())] for row in picked]

    # ------------------------------------------------------------------ the trials file
    def _record(self, trial: Trial) -> dict:
        record = asdict(trial)
        record.pop("choice")
        record.update(trial=record.pop("number"), ranks=dict(zip((s.name for s in self.space.slots), trial.choice)),
                      ok=trial.ok, strategy=self.strategy, direction=self.direction, unit=self.space.unit,
                      budget=self.space.budget, space=self.space.key())
        return record

    def _load(self) -> list[Trial]:
        if not self.trials_file.is_file():
            return []
        trials, key, names = [], self.space.key(), [s.name for s in self.space.slots]
        for line_number, line in enumerate(self.trials_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stored_key, ranks = record["space"], record["ranks"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AutoRankError(f"autorank: {self.trials_file}:{line_number} is not a trial record; move the "
                                    "file away to start a new search") from None
            if stored_key != key or list(ranks) != names:
                raise AutoRankError(f"autorank: {self.trials_file} holds trials of another search space (other "
                                    "model, targets, candidates or budget); use a new trials file")
            choice = self.space.check([ranks[name] for name in names])
            trials.append(Trial(len(trials), choice, record["value"], record["source"], record["rank_pattern"],
                                record["total_rank"], record["trainable_params"], record.get("seconds", 0.0),
                                record.get("info", {})))
        return trials


class RandomRankSearch(AutoRank):
    """The baseline: every trial drawn at random from the feasible set (uniformly when it can be enumerated), the
    same API, budget, trials file and stopping rules as AutoRank."""

    strategy = "random"


@contextlib.contextmanager
def _one_thread():
    """The GP's matrices are tiny: one thread is faster than many and leaves the cores to the trials."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
