"""The shape and options of a GPT, validated. Defaults are GPT-2's; options cover the original Transformer's."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    n_layer: int = Field(12, ge=1, le=4096, description="number of Transformer blocks")
    n_head: int = Field(12, ge=1, le=4096, description="attention heads per block")
    d_model: int = Field(768, ge=1, le=1 << 17, description="width of the residual stream")
    d_ff: Optional[int] = Field(None, ge=1, le=1 << 20,
                                description="hidden width of the feed-forward network (default 4*d_model)")
    vocab_size: int = Field(50304, ge=2, le=1 << 24,
                            description="rows of the token embedding (>= the tokenizer's vocabulary)")
    seq_len: int = Field(1024, ge=1, le=1 << 20,
                         description="context length: tokens per training sample and position table size")
    pos_embedding: Literal["learned", "sinusoidal"] = "learned"
    activation: Literal["gelu_tanh", "gelu", "relu"] = "gelu_tanh"
    tie_embeddings: bool = Field(True, description="the LM head reuses the token embedding matrix")
    scale_embeddings: bool = Field(False, description="multiply token embeddings by sqrt(d_model), as in Vaswani et "
                                   "al.")
    bias: bool = Field(True, description="biases in linear layers and LayerNorms")
    layer_norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections get "
                            "init_std/sqrt(2*n_layer)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        return self

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head
