"""AutoRank's search space: a LoRA rank from a candidate set for each slot (one adapted layer x module, or a group
of them that shares one rank), under one global budget, and the conversion of a choice to a rank_pattern.

    space = RankSpace.from_model(model, rank_budget=64)              # candidates {0, 2, 4, 8, 16}, 0 = no adapter
    choice = space.sample(1, random.Random(0))[0]                    # (rank of slot 0, rank of slot 1, ...)
    add_adapters(model, space.adapter_config(choice))                # exactly space.trainable_params(choice) train

The budget is linear in the ranks: total rank (the sum over adapted modules) or trainable parameters (rank x
(in + out) per module), so "a choice respects the budget" is one integer comparison and the searchers only ever
propose feasible choices (botorch picks among them; nothing is rounded or repaired afterwards).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from athena.adapters.config import AdapterConfig
from athena.adapters.linear import base_dims
from athena.adapters.targets import layer_index, matches, select_modules
from athena.errors import AthenaError

DEFAULT_CANDIDATES = (0, 2, 4, 8, 16)
Choice = tuple[int, ...]  # one rank per slot, in slot order


class AutoRankError(AthenaError, ValueError):
    """A search that cannot be set up or resumed as asked; the message says how to fix it, in one line."""


@dataclass(frozen=True)
class Target:
    """One linear layer an adapter can wrap."""

    path: str  # model.layers.3.self_attn.q_proj
    layer: int | None  # 3 (the first integer of the path); None outside numbered blocks
    kind: str  # self_attn.q_proj (the path after the layer index)
    in_features: int
    out_features: int

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features  # LoRA's A (r x in) and B (out x r)


@dataclass(frozen=True)
class Slot:
    """Targets that share one rank: one (layer, module) pair by default, or a block of layers / a module group."""

    name: str
    targets: tuple[Target, ...]


class RankSpace:
    """Slots x candidate ranks under a budget. Exactly one of rank_budget (sum of ranks over every adapted module) or
    param_budget (trainable LoRA parameters) is given; a choice is feasible when its cost is <= the budget and at
    least one slot has a rank (all-zero adapts nothing)."""

    def __init__(self, slots: Sequence[Slot], candidates: Iterable[int] = DEFAULT_CANDIDATES,
                 rank_budget: int | None = None, param_budget: int | None = None):
        self.slots = tuple(slots)
        self.candidates = _checked_candidates(candidates)
        if not self.slots:
            raise AutoRankError("autorank: the model has no target modules to put ranks on")
        if (rank_budget is None) == (param_budget is None):
            raise AutoRankError("autorank: give exactly one budget: rank_budget (total rank) or param_budget "
                                "(trainable parameters)")
        budget = rank_budget if rank_budget is not None else param_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise AutoRankError(f"autorank: the budget must be an int >= 1, got {budget!r}")
        self.unit: Literal["rank", "params"] = "rank" if rank_budget is not None else "params"
        self.budget = budget
        self.unit_costs = tuple(len(s.targets) if self.unit == "rank" else sum(t.params_per_rank for t in s.targets)
                                for s in self.slots)
        smallest = min(c for c in self.candidates if c > 0)
        cheapest = self._floor() if self.candidates[0] > 0 else smallest * min(self.unit_costs)
        if cheapest > budget:
            raise AutoRankError(f"autorank: {self.unit}_budget={budget} is below the cheapest pattern that adapts "
                                f"anything ({cheapest}); raise it")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model: nn.Module, *, candidates: Iterable[int] = DEFAULT_CANDIDATES,
                   rank_budget: int | None = None, param_budget: int | None = None,
                   adapter_config: AdapterConfig | dict | None = None, layers_per_slot: int = 1,
                   module_groups: dict[str, list[str]] | None = None) -> RankSpace:
        """The targets add_adapters would wrap with `adapter_config` (default: LoRA on the family's default
        targets), grouped into slots: `layers_per_slot` consecutive layers share a rank, and module kinds matching
        one entry of `module_groups` ({"attn": ["q_proj", "k_proj", ...]}) share a rank (default: one slot per
        layer x module)."""
        config = lora_config(adapter_config)
        paths = select_modules(model, config.target_modules, config, "target_modules", "targets")
        targets = []
        for path in paths:
            module = model.get_submodule(path)
            inner = getattr(module, "base_layer", module)
            in_features, out_features, _ = base_dims(inner)
            targets.append(Target(path, layer_index(path), module_kind(path), in_features, out_features))
        return cls(group_targets(targets, layers_per_slot, module_groups), candidates, rank_budget, param_budget)

    # ------------------------------------------------------------------ costs
    def cost(self, choice: Choice) -> int:
        return sum(rank * unit for rank, unit in zip(choice, self.unit_costs))

    def total_rank(self, choice: Choice) -> int:
        return sum(rank * len(slot.targets) for rank, slot in zip(choice, self.slots))

    def trainable_params(self, choice: Choice) -> int:
        """LoRA parameters the choice trains: rank x (in + out) summed over the adapted modules."""
        return sum(rank * t.params_per_rank for rank, slot in zip(choice, self.slots) for t in slot.targets)

    def is_feasible(self, choice: Sequence[int]) -> bool:
        return (len(choice) == len(self.slots) and all(c in self.candidates for c in choice) and any(choice)
                and self.cost(tuple(choice)) <= self.budget)

    def check(self, choice: Sequence[int]) -> Choice:
        choice = tuple(int(c) for c in choice)
        if not self.is_feasible(choice):
            raise AutoRankError(f"autorank: {list(choice)} is not a feasible choice ({len(self.slots)} slots, "
                                f"ranks from {list(self.candidates)}, {self.unit} cost <= {self.budget})")
        return choice

    def _floor(self) -> int:
        return min(self.candidates) * sum(self.unit_costs)

    # ------------------------------------------------------------------ the feasible set
    @property
    def size(self) -> int:
        """Choices before the budget: len(candidates) ** len(slots)."""
        return len(self.candidates) ** len(self.slots)

    def enumerate(self, limit: int = 100_000) -> list[Choice] | None:
        """Every feasible choice (in lexicographic order), or None when there are more than `limit`."""
        out: list[Choice] = []
        suffix_floor = [min(self.candidates) * sum(self.unit_costs[i:]) for i in range(len(self.slots) + 1)]

        def extend(prefix: list[int], spent: int) -> bool:
            i = len(prefix)
            if i == len(self.slots):
                if any(prefix):
                    out.append(tuple(prefix))
                return len(out) <= limit
            for rank in self.candidates:
                cost = spent + rank * self.unit_costs[i]
                if cost + suffix_floor[i + 1] > self.budget:
                    break  # candidates ascend: dearer ones do not fit either
                if not extend(prefix + [rank], cost):
                    return False
            return True

        return out if extend([], 0) else None

    def sample(self, n: int, rng: random.Random) -> list[Choice]:
        """n feasible choices. Each visits the slots in a random order and draws a rank uniformly among those that
        still fit; half are then filled up (slots raised one candidate at a time while the budget allows), since
        the best patterns tend to spend the budget and a plain draw rarely does when there are many slots."""
        out = []
        while len(out) < n:
            choice = self._draw(rng)
            if rng.random() < 0.5:
                choice = self._fill(choice, rng)
            if any(choice):
                out.append(choice)
        return out

    def _draw(self, rng: random.Random) -> Choice:
        ranks = [min(self.candidates)] * len(self.slots)
        spent = self._floor()
        for i in rng.sample(range(len(self.slots)), len(self.slots)):
            base = spent - ranks[i] * self.unit_costs[i]
            fits = [c for c in self.candidates if base + c * self.unit_costs[i] <= self.budget]
            ranks[i] = rng.choice(fits)
            spent = base + ranks[i] * self.unit_costs[i]
        return tuple(ranks)

    def _fill(self, choice: Choice, rng: random.Random) -> Choice:
        ranks = list(choice)
        while True:
            raisable = [i for i in range(len(ranks)) if self._step(ranks, i, +1) is not None]
            if not raisable:
                return tuple(ranks)
            i = rng.choice(raisable)
            ranks[i] = self._step(ranks, i, +1)

    def _step(self, ranks: list[int], i: int, direction: int) -> int | None:
        """The next candidate up (+1) or down (-1) from slot i's rank, if the result is feasible."""
        index = self.candidates.index(ranks[i]) + direction
        if not 0 <= index < len(self.candidates):
            return None
        trial = ranks.copy()
        trial[i] = self.candidates[index]
        return trial[i] if self.is_feasible(trial) else None

    def neighbours(self, choice: Choice) -> list[Choice]:
        """Feasible choices one move away: one slot a candidate up or down, or one up and another down (moving
        capacity between slots at about the same cost)."""
        ranks = list(choice)
        out = set()
        for i in range(len(ranks)):
            for direction in (+1, -1):
                index = self.candidates.index(ranks[i]) + direction
                if not 0 <= index < len(self.candidates):
                    continue
                moved = ranks.copy()
                moved[i] = self.candidates[index]
                if self.is_feasible(moved):
                    out.add(tuple(moved))
                if direction == +1:
                    for j in range(len(ranks)):
                        down = self.candidates.index(ranks[j]) - 1
                        if j != i and down >= 0:
                            swapped = moved.copy()
                            swapped[j] = self.candidates[down]
                            if self.is_feasible(swapped):
                                out.add(tuple(swapped))
        out.discard(tuple(choice))
        return sorted(out)

    def uniform(self) -> Choice:
        """The largest single candidate every slot can have within the budget (the uniform-rank baseline)."""
        for rank in sorted(self.candidates, reverse=True):
            choice = (rank,) * len(self.slots)
            if self.is_feasible(choice):
                return choice
        raise AutoRankError(f"autorank: no uniform rank from {list(self.candidates)} fits {self.unit}_budget="
                            f"{self.budget}; raise the budget or add a smaller candidate")

    def encode(self, choices: Sequence[Choice]) -> torch.Tensor:
        """(n, slots) in [0, 1]: each rank's position in the candidate list, which spaces {0, 2, 4, 8, 16} evenly
        (ranks act on a log scale) and gives the GP a unit cube."""
        scale = max(len(self.candidates) - 1, 1)
        rows = [[self.candidates.index(r) / scale for r in choice] for choice in choices]
        return torch.tensor(rows, dtype=torch.double).reshape(len(rows), len(self.slots))

    # ------------------------------------------------------------------ what a choice becomes
    def ranks_by_target(self, choice: Choice) -> dict[str, int]:
        return {t.path: int(rank) for rank, slot in zip(choice, self.slots) for t in slot.targets}

    def rank_pattern(self, choice: Choice) -> dict[str, int]:
        """{escaped module path: rank} for every target, 0 included (that module gets no adapter): what
        AdapterConfig.rank_pattern takes. Escaped paths match only their module (layers.1 never matches layers.11)."""
        return {re.escape(path): rank for path, rank in self.ranks_by_target(self.check(choice)).items()}

    def adapter_config(self, choice: Choice, base: AdapterConfig | dict | None = None) -> AdapterConfig:
        """`base` (default: LoRA on the family's targets) with this choice's rank_pattern."""
        config = lora_config(base).to_dict()
        pattern = self.rank_pattern(choice)
        config.update(rank_pattern=pattern, rank=max(pattern.values()))  # rank: modules the pattern misses (none)
        return AdapterConfig.from_dict(config)

    def describe(self) -> dict:
        """The space as JSON: what a trials file is checked against when a search resumes."""
        return {"candidates": list(self.candidates), "budget": self.budget, "unit": self.unit,
                "slots": [{"name": s.name, "targets": [[t.path, t.in_features, t.out_features] for t in s.targets]}
                          for s in self.slots]}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"RankSpace({len(self.slots)} slots, candidates {list(self.candidates)}, {self.unit} budget "
                f"{self.budget})")


def lora_config(config: AdapterConfig | dict | None) -> AdapterConfig:
    """The adapter config AutoRank builds on: LoRA (its ranks are what is searched) unless told otherwise."""
    if config is None:
        return AdapterConfig(method="lora")
    if isinstance(config, dict):
        config = AdapterConfig.from_dict({"method": "lora", **config})
    if not config.lora_on or config.method == "hybrid":
        raise AutoRankError(f"autorank searches LoRA ranks; adapter method {config.method!r} has no per-module LoRA "
                            "rank to search (use method=lora, or moe/poly with LoRA on)")
    return config


def module_kind(path: str) -> str:
    """The path after its last numeric component (`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`)."""
    parts = path.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
    return ".".join(parts[last + 1:]) if last is not None and last < len(parts) - 1 else path


def group_targets(targets: list[Target], layers_per_slot: int = 1,
                  module_groups: dict[str, list[str]] | None = None) -> list[Slot]:
    if isinstance(layers_per_slot, bool) or not isinstance(layers_per_slot, int) or layers_per_slot < 1:
        raise AutoRankError(f"autorank: layers_per_slot must be an int >= 1, got {layers_per_slot!r}")
    groups = dict(module_groups or {})

    def group_of(kind: str) -> str:
        return next((name for name, patterns in groups.items() if any(matches(p, kind) for p in patterns)), kind)

    slots: dict[tuple, list[Target]] = {}
    for target in targets:
        block = None if target.layer is None else target.layer // layers_per_slot
        slots.setdefault((block, group_of(target.kind)), []).append(target)
    unused = [name for name in groups if not any(key[1] == name for key in slots)]
    if unused:
        raise AutoRankError(f"autorank: module_groups {unused} match no target module; target kinds are "
                            f"{sorted({t.kind for t in targets})}")

    def name(block: int | None, group: str) -> str:
        if block is None:
            return group
        first, last = block * layers_per_slot, block * layers_per_slot + layers_per_slot - 1
        return f"L{first}.{group}" if layers_per_slot == 1 else f"L{first}-{last}.{group}"

    order = sorted(slots, key=lambda key: (key[0] is None, key[0] or 0))  # stable: module order inside a block
    return [Slot(name(block, group), tuple(slots[(block, group)])) for block, group in order]


def _checked_candidates(candidates: Iterable[int]) -> tuple[int, ...]:
    try:
        values = list(candidates)
    except TypeError:
        raise AutoRankError(f"autorank: candidates must be a list of ranks, got {candidates!r}") from None
    if not values or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in values):
        raise AutoRankError(f"autorank: candidates must be ints >= 0 (0 = no adapter), got {values}")
    values = sorted(set(values))
    if not any(values):
        raise AutoRankError(f"autorank: candidates {values} give no module a rank; add at least one rank >= 1")
    return tuple(values)


def unescape(pattern: str) -> str:
    """A rank_pattern key written by RankSpace.rank_pattern back to its module path."""
    return re.sub(r"\\(.)", r"\1", pattern)

