"""The plain-PyTorch GPT: single-device code only; parallelism is applied to it from outside (gptdist.parallel).

Exports are resolved lazily so that `gptdist.model.config` (imported by the run-config schema and
the CLI) does not pull in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from gptdist.model.config import GPTConfig

_LAZY = {
    "GPT": "gptdist.model.gpt",
    "KVCache": "gptdist.model.kv_cache",
    "init_parameters": "gptdist.model.init",
    "init_value": "gptdist.model.init",
    "count_parameters": "gptdist.model.flops",
    "flops_per_token": "gptdist.model.flops",
    "generate": "gptdist.model.decoding",
}

__all__ = ["GPTConfig", "GPT", "KVCache", "init_parameters", "init_value", "count_parameters", "flops_per_token",
           "generate"]  # the same names as _LAZY

if TYPE_CHECKING:
    from gptdist.model.decoding import generate
    from gptdist.model.flops import count_parameters, flops_per_token
    from gptdist.model.gpt import GPT
    from gptdist.model.init import init_parameters, init_value
    from gptdist.model.kv_cache import KVCache


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptdist.model' has no attribute {name!r}")
