"""From what the user typed to one complete checkpoint, and from that checkpoint to a model and its tokenizer.

A run directory (it has checkpoints/) or a checkpoints folder stands for its newest complete checkpoint; a
checkpoint folder named directly must be complete itself: a tool quietly falling back to an older checkpoint
than the one named would export or evaluate something else than the user asked for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from gptdist.checkpoint.locate import first_verified, named_candidates, verify_for_reading
from gptdist.checkpoint.manifest import STATE_FILE
from gptdist.checkpoint.store import read_state
from gptdist.config import RunConfig
from gptdist.data import load_tokenizer
from gptdist.errors import UserError

INDEX = Path("model") / "index.json"


def _warn(message: str) -> None:
    print(f"gptdist: warning: {message}", file=sys.stderr)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder `path` stands for, its layout-free weights verified by checksum; a UserError saying
    what is wrong otherwise. A run directory falls back to its previous checkpoint past a corrupted one, as a
    resume does; a checkpoint named directly must be intact."""
    candidates = named_candidates(path, _warn)
    folder = first_verified(candidates, verify_for_reading, _warn, named=path)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"{folder}: no {STATE_FILE}; this is not a checkpoint gptdist wrote")
    if not (folder / INDEX).is_file():
        raise UserError(f"{folder}: no {INDEX}, the layout-free weights the tools read; "
                        "it was written by an older gptdist: resume it with `gptdist train` and save again")
    return folder


@dataclass
class Checkpoint:
    folder: Path
    state: Dict[str, Any]
    cfg: Any  # gptdist.config.RunConfig

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def tokenizer(self, spec: Optional[str] = None):
        """The tokenizer the model was trained with: the run config's data.tokenizer (relative paths resolve from
        the current directory, as in training) or `spec`; either must be the very tokenizer the checkpoint
        recorded, since other ids would make the model's output meaningless."""
        spec = spec or self.cfg.data.tokenizer
        key = "--tokenizer" if spec != self.cfg.data.tokenizer else f"{self.folder / STATE_FILE}: config data.tokenizer"
        if spec.strip().lower() != "gpt2" and not Path(spec).expanduser().exists():
            raise UserError(f"{key}={spec!r}: no such file or folder (relative paths are read from the current "
                            f"directory {Path.cwd()}); run from the training directory or pass --tokenizer PATH")
        tok = load_tokenizer(spec, key=key)
        saved = self.state.get("tokenizer")
        if saved and saved != tok.identity:
            raise UserError(f"{key}={spec!r} is not the tokenizer {self.folder} was trained with (identity "
                            f"{tok.identity[:12]}..., the checkpoint recorded {saved[:12]}...); pass --tokenizer "
                            "with the training tokenizer")
        return tok

    def model(self, device: Optional[str] = None):
        """The plain GPT in eval mode with the checkpoint's fp32 weights, on `device` (default: cuda if any)."""
        # torch: only when the model is built; the tokenizer and config are read without it
        import torch

        from gptdist.checkpoint.layout_free import LayoutFreeReader
        from gptdist.model import GPT

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = LayoutFreeReader(self.folder / "model").state_dict()
        # Built on meta and given the loaded tensors: no random init, no second copy of the weights.
        model = GPT(self.cfg.model, seed=None, device="meta")
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if missing or unexpected:
            raise UserError(f"{self.folder / INDEX}: weights do not fit the checkpoint's model config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if self.cfg.model.pos_embedding == "sinusoidal":  # a non-persistent buffer: rebuild it, it is not saved
            # torch: model.embedding imports torch; only for sinusoidal positions
            from gptdist.model.embedding import sinusoidal_positions

            model.embed.pos_table = sinusoidal_positions(self.cfg.model.seq_len, self.cfg.model.d_model)
        return model.to(device).eval()


def open_checkpoint(path: str | Path) -> Checkpoint:
    folder = find_checkpoint(Path(path))
    state = read_state(folder)
    try:
        cfg = RunConfig.model_validate(state.get("config") or {})
    except ValueError as exc:
        raise UserError(f"{folder / STATE_FILE}: its config does not validate with this gptdist "
                        f"({str(exc).splitlines()[0]})") from None
    return Checkpoint(folder, state, cfg)
