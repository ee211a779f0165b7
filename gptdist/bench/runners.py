"""One training step for each row of `gptdist bench train`, all on the same model shape, batch and random tokens.

Every runner is built inside its own worker process (workers.py) and exposes `step()`: forward, backward, gradient
clipping and one AdamW update of the config's micro-batch. On CPU the step ends when the work is done; on GPU
`sync()` waits for the device, once per timed window, as training only syncs once per logging window.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

from gptdist.config import RunConfig
from gptdist.engine.build import build_training_engine
from gptdist.engine.ds_config import resolve_precision
from gptdist.engine.optim import build_optimizer
from gptdist.engine.process import discover_world, start_rank
from gptdist.model import GPT
from gptdist.model.hf import hf_config_from
from gptdist.parallel.layout import Layout
from gptdist.train.drills import FaultDrills
from gptdist.train.stepper import Stepper
from gptdist.train.stop import StopRequest

ROWS = ("gptdist", "plain", "plain-chunked", "transformers", "ceiling")
TITLES = {
    "gptdist": "gptdist 1 rank (DeepSpeed ZeRO-0)",
    "plain": "plain PyTorch loop (nanoGPT)",
    "plain-chunked": "plain loop + gptdist chunked loss",
    "transformers": "transformers GPT2LMHeadModel",
    "ceiling": "matmul ceiling",
}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_batch(cfg: RunConfig, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same (inputs, targets) in every worker: uniform random tokens from a seeded generator."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_len)
    x = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    y = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    return x.to(device), y.to(device)


def full_logits_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """nanoGPT's head: all (B*T, vocab) logits, then F.cross_entropy (in float32, as gptdist's head)."""
    logits = F.linear(hidden, weight)
    if targets is None:
        return logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


class PlainRunner:
    """gptdist.model.GPT + the same torch AdamW param groups + clip_grad_norm_, no DeepSpeed: the nanoGPT loop.
    `chunked=False` swaps in nanoGPT's full-logits loss; True keeps gptdist's chunked head (the same model the
    gptdist row trains), which separates what the head gains from what DeepSpeed costs."""

    def __init__(self, cfg: RunConfig, chunked: bool):
        dev = device_type()
        _same_gpu_settings(dev)
        self.device = torch.device(dev)
        self.model = GPT(cfg.model, seed=cfg.train.seed).to(self.device).train()
        if not chunked:
            self.model.head.forward = full_logits_loss
        self.opt = build_optimizer(self.model, cfg.train, dev)
        self.clip = cfg.train.grad_clip
        self.x, self.y = random_batch(cfg, self.device)
        self.autocast = _autocast(cfg, dev)
        self.params = list(self.model.parameters())

    def step(self) -> None:
        with self.autocast:
            loss = self.model(self.x, self.y)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class TransformersRunner(PlainRunner):
    """transformers' GPT2LMHeadModel of the same shape (SDPA attention), its own loss (labels), the same loop."""

    def __init__(self, cfg: RunConfig):
        # transformers: slow to import, only for the transformers row
        import transformers

        dev = device_type()
        _same_gpu_settings(dev)
        self.device = torch.device(dev)
        hf_cfg = hf_config_from(cfg.model)
        hf_cfg.use_cache = False
        torch.manual_seed(cfg.train.seed)
        self.model = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").to(self.device)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.train, dev)
        self.clip = cfg.train.grad_clip
        self.x, _ = random_batch(cfg, self.device)
        self.autocast = _autocast(cfg, dev)
        self.params = list(self.model.parameters())

    def step(self) -> None:
        with self.autocast:
            loss = self.model(input_ids=self.x, labels=self.x).loss  # shifts the labels itself
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class DeepSpeedRunner:
    """The 1-rank gptdist step, built by the bootstrap `gptdist train` uses (a world of one process) and driven the
    way train/loop.py drives it each optimizer step: the Stepper (lr, step, grad norm) and the stop agreement."""

    def __init__(self, cfg: RunConfig):
        world = discover_world()
        rank = start_rank(cfg, world, Layout.resolve(cfg, world.size))
        drills = FaultDrills(world.rank, env={})
        self.engine, step_fn, _ = build_training_engine(cfg, rank, None, drills)
        self.engine.train()
        self.device = self.engine.device
        self.stepper = Stepper(self.engine, step_fn, itertools.repeat(random_batch(cfg, self.device)), drills)
        self.stop = StopRequest()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        self.stepper.step(self.done)
        self.stop.agreed(self.engine.device)


class CeilingRunner:
    """No training: one large matmul, fp32 on CPU, bf16 on GPU; `flops()` is its measured FLOP/s."""

    def __init__(self, cfg: RunConfig):
        dev = device_type()
        self.device = torch.device(dev)
        self.dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        self.n = 8192 if dev == "cuda" else 2048
        self.a = torch.randn(self.n, self.n, device=self.device, dtype=self.dtype)
        self.b = torch.randn(self.n, self.n, device=self.device, dtype=self.dtype)

    def step(self) -> None:
        torch.mm(self.a, self.b)

    @property
    def flops_per_step(self) -> float:
        return 2.0 * self.n**3


def _same_gpu_settings(dev: str) -> None:
    """What prepare_process (engine/process.py) sets on a GPU rank (TF32 for fp32 matmuls), so the plain rows get it
    too."""
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _autocast(cfg: RunConfig, dev: str):
    """bf16 autocast for the plain loops where gptdist trains in bf16 (GPUs), else nothing."""
    if resolve_precision(cfg, dev) == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    return torch.autocast(dev, enabled=False)


def build_runner(row: str, cfg: RunConfig):
    if row == "gptdist":
        return DeepSpeedRunner(cfg)
    if row in ("plain", "plain-chunked"):
        return PlainRunner(cfg, chunked=row == "plain-chunked")
    if row == "transformers":
        return TransformersRunner(cfg)
    if row == "ceiling":
        return CeilingRunner(cfg)
    raise ValueError(f"unknown row {row!r}")


def describe(runner) -> Dict[str, Any]:
    model = getattr(runner, "model", None) or getattr(getattr(runner, "engine", None), "module", None)
    params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    return {"params": params, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "flops_per_step": getattr(runner, "flops_per_step", None)}
