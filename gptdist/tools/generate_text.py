"""`gptdist generate CHECKPOINT_OR_RUN --prompt TEXT`: continue a prompt with the checkpoint's model.

Decoding is gptdist.model.generate (KV cache, stops at the tokenizer's end-of-text id or when the context is
full); this module only turns text into ids and back and picks greedy or sampled decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from gptdist.errors import UserError
from gptdist.tools.resolve import Checkpoint


@dataclass
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def check(self) -> None:
        if self.greedy:
            return
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: must be > 0 (use --greedy for argmax decoding)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k {self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")


@dataclass
class Generation:
    prompt_ids: List[int]
    ids: List[int]  # the generated ids only (the EOS id included when decoding stopped at it)
    text: str  # the decoded continuation, without a final EOS

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text}


def generate_text(ckpt: Checkpoint, prompt: str, max_new_tokens: int, sampling: Sampling,
                  tokenizer_spec: Optional[str] = None, device: Optional[str] = None) -> Generation:
    # torch: only when generating; the tools' modules import without it
    import torch

    from gptdist.model import generate

    sampling.check()
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    tok = ckpt.tokenizer(tokenizer_spec)
    # An empty prompt starts from end-of-text, the token every training document follows (GPT-2's convention).
    prompt_ids = tok.encode(prompt) or [tok.eos_id]
    seq_len = ckpt.cfg.model.seq_len
    if len(prompt_ids) >= seq_len:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context (model.seq_len) is {seq_len}, "
                        "so it must be shorter to leave room for new tokens")
    model = ckpt.model(device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(sampling.seed)
    ids = generate(model, prompt_ids, max_new_tokens, greedy=sampling.greedy, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p, eos_id=tok.eos_id, generator=generator)
    shown = ids[:-1] if ids and ids[-1] == tok.eos_id else ids  # the EOS is where it stopped, not text
    return Generation(prompt_ids, ids, tok.decode(shown))
