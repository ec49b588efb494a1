"""Tiny Recursive Model (TRM), "Less is More: Recursive Reasoning with Tiny Networks" (Jolicoeur-Martineau, 2025).

One tiny network `net` is applied recursively to two states over the whole (puzzle prefix + puzzle) sequence:
    y (z_H): the current answer, decoded by lm_head;   z (z_L): a latent reasoning state.
One supervision step:
    H_cycles - 1 times without grad, then once with grad:
        L_cycles times:  z = net(z + y + x)      # refine the latent given question x and answer y
        y = net(y + z)                           # refine the answer from the latent
Deep supervision: the (detached) states are carried to the next call through SupervisionCarry, and a halting
head decides, per slot, when a puzzle is done so its slot can take a fresh one (ACT).
"""

import math

import torch
from torch import nn
from pydantic import ValidationError
from torch.utils.checkpoint import checkpoint as activation_checkpoint


from athena.models.trm.attention_memory import RecursionMemory
from athena.models.trm.carry import SupervisionCarry, SupervisionOutput
from athena.models.trm.config import TRMConfig
from athena.models.trm.layers import Block, Linear, RotaryEmbedding, trunc_normal_
from athena.models.trm.losses import deep_supervision_loss
from athena.models.trm.puzzle_embedding import PuzzleEmbedding


class ReasoningNet(nn.Module):
    """The single tiny network of TRM: add the injection, then run `num_layers` post-norm blocks."""

    def __init__(self, num_layers: int, **block_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(Block(**block_kwargs) for _ in range(num_layers))

    def forward(
        self,
        h: torch.Tensor,  # (B, L, hidden)
        injection: torch.Tensor,  # (B, L, hidden)
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        h = h + injection
        for layer in self.layers:
            if checkpoint:
                h = activation_checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return h  # (B, L, hidden)


class TinyRecursiveModel(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, num_puzzle_identifiers: int, config: TRMConfig | None = None,
                 **hyperparameters):
        """The sizes come from the data; the rest is a TRMConfig (defaults: the paper's TRM-Att), given whole or as
        keyword arguments (`TinyRecursiveModel(8, 36, 1, hidden_size=128, mixer="mlp")`, as Hydra builds it).
        A bad value raises one ValueError line naming it."""
        super().__init__()
        config = config_from(config, hyperparameters)
        if vocab_size < 1 or seq_len < 1:
            raise ValueError(f"TinyRecursiveModel: vocab_size and seq_len must be >= 1, got {vocab_size} and {seq_len}")
        if config.puzzle_emb_len and num_puzzle_identifiers < 1:
            raise ValueError("TinyRecursiveModel: num_puzzle_identifiers must be >= 1 when puzzle_emb_len > 0, got "
                             f"{num_puzzle_identifiers}")
        self.config = config
        hidden_size, num_heads, num_layers, mixer = config.hidden_size, config.num_heads, config.num_layers, config.mixer
        puzzle_emb_len, puzzle_emb_dim = config.puzzle_emb_len, config.puzzle_table_dim
        self.H_cycles, self.L_cycles = config.H_cycles, config.L_cycles
        self.halt_max_steps, self.halt_exploration_prob = config.halt_max_steps, config.halt_exploration_prob
        self.halt_loss_weight, self.loss_type = config.halt_loss_weight, config.loss_type
        self.gradient_checkpointing, self.stream_dtype = config.gradient_checkpointing, config.stream_dtype

        self.vocab_size, self.seq_len, self.hidden_size = vocab_size, seq_len, hidden_size
        self.num_heads, self.num_layers, self.mixer = num_heads, num_layers, mixer
        self.puzzle_emb_len = puzzle_emb_len
        self.total_len = puzzle_emb_len + seq_len  # the network runs over the puzzle prefix + the puzzle

        # Input: token embedding with std 1/sqrt(hidden), scaled by sqrt(hidden) -> unit-scale inputs.
        self.embed_scale = math.sqrt(hidden_size)
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        trunc_normal_(self.embed_tokens.weight, std=1.0 / self.embed_scale)
        self.puzzle_embedding = None
        if puzzle_emb_len > 0:
            self.puzzle_embedding = PuzzleEmbedding(num_puzzle_identifiers, puzzle_emb_dim, puzzle_emb_len, hidden_size)
        self.rotary = None  # the MLP mixer has no attention, hence no positions to rotate
        if mixer == "attention":
            self.rotary = RotaryEmbedding(hidden_size // num_heads, self.total_len, config.rope_theta)

        self.net = ReasoningNet(
            num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            expansion=config.expansion,
            mixer=mixer,
            total_len=self.total_len,
            eps=config.rms_norm_eps,
            ffn_capacity=config.ffn_capacity,
        )
        self.routers = [layer.routed_ffn for layer in self.net.layers if layer.routed_ffn is not None]

        # Fixed (not learned) starting points of y and z, broadcast to every position of a fresh slot.
        self.register_buffer("H_init", trunc_normal_(torch.empty(hidden_size), std=1.0))  # (hidden,)
        self.register_buffer("L_init", trunc_normal_(torch.empty(hidden_size), std=1.0))  # (hidden,)

        self.lm_head = Linear(hidden_size, vocab_size)
        # Outputs (halt, continue); TRM only trains halt. Start at "never halt" (sigmoid(-5) ~ 0.007) so early
        # training uses all supervision steps instead of halting on noise.
        self.q_head = Linear(hidden_size, 2, bias=True)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        # Built last, so the weights above draw the same random numbers as without it.
        self.recursion_memory = RecursionMemory(self.net, config) if config.amrpa_window else None

    # ---- forward pieces, in data-flow order ----

    def embed_input(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """inputs (B, seq_len), puzzle_identifiers (B,) -> x (B, puzzle_emb_len + seq_len, hidden), in `dtype`."""
        x = self.embed_tokens(inputs)  # (B, seq_len, hidden)
        if dtype is not None:
            x = x.to(dtype)
        if self.puzzle_embedding is not None:
            x = torch.cat((self.puzzle_embedding(puzzle_identifiers).to(x.dtype), x), dim=1)  # (B, total_len, hidden)
        return self.embed_scale * x

    def reset_slots(self, carry: SupervisionCarry, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
        """Slots that halted last call restart: fresh y/z (in `dtype`), steps 0, and the new batch's data there."""
        fresh = carry.halted  # (B,)
        H_init, L_init, z_H, z_L = self.H_init, self.L_init, carry.z_H, carry.z_L
        if dtype is not None:
            H_init, L_init, z_H, z_L = H_init.to(dtype), L_init.to(dtype), z_H.to(dtype), z_L.to(dtype)
        z_H = torch.where(fresh[:, None, None], H_init, z_H)  # (B, L, hidden)
        z_L = torch.where(fresh[:, None, None], L_init, z_L)
        steps = torch.where(fresh, 0, carry.steps)
        data = {}
        for k, old in carry.current_data.items():
            data[k] = torch.where(fresh.view(-1, *([1] * (old.ndim - 1))), batch[k], old)
        return z_H, z_L, steps, data

    def recurse(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One supervision step of recursion; only the last H cycle is differentiated (TRM's 1-step gradient)."""
        cos, sin = self.rotary() if self.rotary is not None else (None, None)
        if self.recursion_memory is not None:
            self.recursion_memory.start()  # each supervision step remembers only its own applications
        with torch.no_grad():
            for _ in range(self.H_cycles - 1):
                for _ in range(self.L_cycles):
                    z_L = self.net(z_L, z_H + x, cos, sin)
                z_H = self.net(z_H, z_L, cos, sin)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for _ in range(self.L_cycles):
            z_L = self.net(z_L, z_H + x, cos, sin, checkpoint=ckpt)
        z_H = self.net(z_H, z_L, cos, sin, checkpoint=ckpt)
        return z_H, z_L

    @torch.no_grad()
    def decide_halt(self, steps: torch.Tensor, q_halt_logits: torch.Tensor) -> torch.Tensor:
        """steps (B,) after this step, q_halt_logits (B,) -> halted (B,) bool. No host syncs."""
        halted = steps >= self.halt_max_steps
        # Eval always runs halt_max_steps, so every slot of an eval batch finishes together.
        if self.training and self.halt_max_steps > 1:
            halted = halted | (q_halt_logits > 0)
            # Exploration: some slots must run a random minimum number of steps, so the Q head also sees (and
            # learns from) states later than the ones it currently halts at. Redrawn every step, as in official TRM.
            explore = torch.rand_like(q_halt_logits) < self.halt_exploration_prob
            min_steps = explore * torch.randint_like(steps, low=2, high=self.halt_max_steps + 1)
            halted = halted & (steps >= min_steps)
        return halted

    def forward(
        self, carry: SupervisionCarry, batch: dict[str, torch.Tensor]
    ) -> tuple[SupervisionCarry, SupervisionOutput]:
        """One deep-supervision step. batch: inputs (B, seq_len), labels (B, seq_len), puzzle_identifiers (B,)."""
        device = carry.z_H.device.type
        # The stream (states, input embedding, hence the carry) in the autocast dtype from the start: no float32
        # copies of stream-sized tensors (three of them, 153 MB each at batch 768, were live at the H100 peak,
        # outputs of the compiled graphs around the puzzle embedding's graph break; docs/benchmarks.md).
        stream = torch.get_autocast_dtype(device) if (
            self.stream_dtype == "autocast" and torch.is_autocast_enabled(device)) else None
        z_H, z_L, steps, data = self.reset_slots(carry, batch, stream)
        for router in self.routers:  # drop what an activation-checkpoint recompute left since the last forward
            router.take_aux()
        x = self.embed_input(data["inputs"], data["puzzle_identifiers"], stream)  # (B, L, hidden)
        z_H, z_L = self.recurse(z_H, z_L, x)

        # Head over all positions, then slice (as the official TRM): the head saves z_H itself for backward, which
        # the carry holds anyway, instead of a contiguous copy of its puzzle positions (~60 MB at batch 768).
        logits = self.lm_head(z_H)[:, self.puzzle_emb_len :]  # (B, seq_len, vocab)
        q_halt_logits = self.q_head(z_H[:, 0]).float()[:, 0]  # (B,) read from the first position
        steps = steps + 1
        halted = self.decide_halt(steps, q_halt_logits)

        loss, metrics = deep_supervision_loss(
            logits, data["labels"], q_halt_logits, halted, steps, self.loss_type, self.halt_loss_weight
        )
        if self.recursion_memory is not None:  # AMRPA's regularisers (diversity, gate) join the loss
            loss = self.recursion_memory.finish(loss, logits.shape[0])
        if self.routers:
            loss = self.add_router_terms(loss, metrics, batch_size=logits.shape[0])
        new_carry = SupervisionCarry(z_H.detach(), z_L.detach(), steps, halted, data)
        return new_carry, SupervisionOutput(loss, metrics, logits, q_halt_logits)

    def add_router_terms(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Capacity routing (ffn_capacity < 1): the routers' aux losses of this step's grad-enabled applications
        join the loss (weighted per sample: the loss is a sum over the batch), their means and the realised
        capacity join the metrics (logged as means per step)."""
        z_losses, entropies = [], []
        for router in self.routers:
            z, entropy = router.take_aux()
            if z is not None:
                z_losses.append(z)
                entropies.append(entropy)
        realised = self.routers[0].realised_capacity(self.total_len)  # every router has the config's capacity
        metrics["realised_capacity"] = torch.tensor(realised, device=loss.device)
        if z_losses:
            z, entropy = torch.stack(z_losses).mean(), torch.stack(entropies).mean()
            cfg = self.config
            loss = loss + batch_size * (cfg.router_z_loss_weight * z + cfg.router_entropy_weight * entropy)
            metrics["router_z_loss"], metrics["router_entropy"] = z.detach(), entropy.detach()
        return loss

    # ---- helpers for the trainer ----

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> SupervisionCarry:
        """An all-halted carry, so the first forward loads `batch` into every slot and starts it fresh."""
        B, device = batch["inputs"].shape[0], batch["inputs"].device
        state = torch.zeros(B, self.total_len, self.hidden_size, dtype=self.H_init.dtype, device=device)
        return SupervisionCarry(
            z_H=state,
            z_L=state.clone(),
            steps=torch.zeros(B, dtype=torch.int32, device=device),
            halted=torch.ones(B, dtype=torch.bool, device=device),
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(dense params for AdamAtan2, puzzle-embedding params for SignSGD), trainable ones only (requires_grad):
        with a frozen base (adapters) the optimisers, EMA and gradient sync see only what trains."""
        table = list(self.puzzle_embedding.parameters()) if self.puzzle_embedding is not None else []
        table_ids = {id(p) for p in table}
        sparse = [p for p in table if p.requires_grad]
        dense = [p for p in self.parameters() if id(p) not in table_ids and p.requires_grad]
        return dense, sparse

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (train.parallel=fsdp): those of the one reasoning network."""
        return list(self.net.layers)

    def num_parameters(self, include_puzzle_embedding: bool = False) -> int:
        """Trainable parameter count; the puzzle table is excluded by default (it scales with the dataset)."""
        dense, sparse = self.param_groups()
        return sum(p.numel() for p in dense + (sparse if include_puzzle_embedding else []))

    def extra_repr(self) -> str:
        return (
            f"mixer={self.mixer}, hidden={self.hidden_size}, layers={self.num_layers}, H_cycles={self.H_cycles}, "
            f"L_cycles={self.L_cycles}, halt_max_steps={self.halt_max_steps}, puzzle_emb_len={self.puzzle_emb_len}, "
            f"params={self.num_parameters() / 1e6:.2f}M"
        )


def config_from(config: TRMConfig | None, hyperparameters: dict) -> TRMConfig:
    """TRMConfig from a given config or keyword arguments (not both); its first problem as one ValueError line."""
    if config is not None and hyperparameters:
        raise ValueError(f"TinyRecursiveModel: give a config or keyword hyperparameters, not both ({sorted(hyperparameters)})")
    if config is not None:
        return config
    try:
        return TRMConfig(**hyperparameters)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "unknown argument" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ValueError(f"TinyRecursiveModel: {where + ': ' if where else ''}{message}") from None
