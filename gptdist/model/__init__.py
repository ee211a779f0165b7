"""The plain-PyTorch GPT: no DeepSpeed or torch.distributed here; parallelism is applied from outside.

Exports are resolved lazily so that `gptdist.model.config` (imported by the run-config schema and
the CLI) does not pull in torch.
"""

from __future__ import annotations

import sys
import types
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
    "generate": "gptdist.model.generate",
}

__all__ = ["GPTConfig", *_LAZY]

if TYPE_CHECKING:
    from gptdist.model.flops import count_parameters, flops_per_token
    from gptdist.model.generate import generate
    from gptdist.model.gpt import GPT
    from gptdist.model.init import init_parameters, init_value
    from gptdist.model.kv_cache import KVCache


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptdist.model' has no attribute {name!r}")


class _Package(types.ModuleType):
    # `generate` names both a submodule and the function it defines. Importing the submodule makes
    # Python set the package attribute to the module, which would then shadow the function for every
    # later `from gptdist.model import generate`; keep the function instead.
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
