"""The layout of a run: how many ranks do what, and the batch arithmetic that follows from it.

Resolved from the config and the world size before any process group exists, so a layout that cannot work is
refused in one line instead of a hang or a stack trace from deep inside DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptdist.config import RunConfig
from gptdist.errors import UserError


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum: int  # micro-batches per rank per optimizer step (the pipeline's micro-batch count when pp > 1)
    activation_checkpointing: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def key(self) -> tuple:
        """What tells two candidate layouts apart in `gptdist plan` (the batch size is shared by all of them)."""
        return (self.tp, self.pp, self.dp, self.zero_stage, self.micro_batch_size, self.activation_checkpointing)

    def record(self) -> dict:
        """What a checkpoint and the memory report write down of the layout (a resume compares it: same_layout)."""
        return {k: getattr(self, k) for k in ("tp", "pp", "dp", "zero_stage", "micro_batch_size", "grad_accum")}

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    @property
    def bubble_fraction(self) -> float:
        """Idle share of a 1F1B pipeline step: (p - 1) / (m + p - 1) for p stages and m micro-batches."""
        return (self.pp - 1) / (self.grad_accum + self.pp - 1)

    def describe(self) -> str:
        return (
            f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage} | "
            f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x accum {self.grad_accum} "
            f"x dp {self.dp}"
        )

    @classmethod
    def resolve(cls, cfg: RunConfig, world_size: int) -> "Layout":
        par, train, model = cfg.parallel, cfg.train, cfg.model
        model_parallel = par.tp * par.pp
        if world_size % model_parallel:
            raise UserError(
                f"layout error: world size {world_size} is not a multiple of parallel.tp*parallel.pp = "
                f"{par.tp}*{par.pp} = {model_parallel}; start {model_parallel}*k ranks or change tp/pp"
            )
        dp = world_size // model_parallel
        if model.n_head % par.tp:
            raise UserError(f"layout error: model.n_head={model.n_head} is not divisible by parallel.tp={par.tp}")
        if model.vocab_size % par.tp:
            raise UserError(
                f"layout error: model.vocab_size={model.vocab_size} is not divisible by parallel.tp={par.tp}; "
                f"pad it, e.g. model.vocab_size={-(-model.vocab_size // (64 * par.tp)) * 64 * par.tp}"
            )
        if model.ffn_dim % par.tp:
            raise UserError(f"layout error: model.d_ff={model.ffn_dim} is not divisible by parallel.tp={par.tp}")
        if model.n_layer < par.pp:
            raise UserError(f"layout error: model.n_layer={model.n_layer} is smaller than parallel.pp={par.pp}")
        if par.pp > 1 and not model.tie_embeddings:
            raise UserError(
                f"layout error: parallel.pp={par.pp} needs model.tie_embeddings=true (the last stage scores against "
                "its tied copy of the token embedding); set model.tie_embeddings=true or parallel.pp=1"
            )
        per_step = train.micro_batch_size * dp
        global_batch = train.global_batch_size or per_step
        if global_batch % per_step:
            raise UserError(
                f"layout error: train.global_batch_size={global_batch} is not a multiple of "
                f"train.micro_batch_size*dp = {train.micro_batch_size}*{dp} = {per_step}"
            )
        return cls(par.tp, par.pp, dp, par.zero_stage, train.micro_batch_size, global_batch // per_step,
                   par.activation_checkpointing)
