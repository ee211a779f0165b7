"""`gptdist export CHECKPOINT_OR_RUN --hf OUT_DIR`: a directory `transformers.GPT2LMHeadModel.from_pretrained`
loads, with the tokenizer files `GPT2TokenizerFast.from_pretrained` loads, from the layout-free weights.

The files are written directly (config.json + model.safetensors, fp32) rather than through a GPT2LMHeadModel:
building one would first random-initialize a second full copy of the model only to overwrite it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

from gptdist.errors import UserError
from gptdist.tools.resolve import Checkpoint

WEIGHTS = "model.safetensors"


def refuse_unsafe_target(out: Path, source: Path, force: bool) -> None:
    """--force empties OUT_DIR: never a folder holding the checkpoint being exported, nor one inside it, nor the
    working directory, $HOME or the root (a slip of the argument would delete far more than a model)."""
    target = out.resolve()
    src = source.resolve()
    if target == src or target in src.parents:
        raise UserError(f"--hf {out} holds the checkpoint being exported ({source}); choose a new directory outside it")
    if src in target.parents:
        raise UserError(f"--hf {out} is inside the checkpoint being exported ({source}); choose a directory outside it")
    if not force:
        return  # nothing is emptied: a folder that is not empty is refused by prepare_out_dir
    home = Path(os.environ.get("HOME") or Path.home())
    for name, folder in (("the working directory", Path.cwd()), ("$HOME", home), ("the root", Path("/"))):
        if target == folder.resolve():
            raise UserError(f"--hf {out} is {name}; --force would empty it: name a new directory for the model")


def prepare_out_dir(out: Path, force: bool, source: Optional[Path] = None) -> None:
    """Refuse to mix a new model with whatever OUT_DIR already holds; --force empties it first."""
    if source is not None:
        refuse_unsafe_target(out, source, force)
    if out.exists() and not out.is_dir():
        raise UserError(f"--hf {out} is a file; name a directory to write the model into")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--hf {out} is not empty; choose a new directory or pass --force to replace its contents")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def hf_state_dict(ckpt: Checkpoint) -> Dict:
    """GPT2LMHeadModel's tensors for the checkpoint; a tied head is left out, as save_pretrained does."""
    # torch: model.hf imports torch; only when exporting
    from gptdist.model.hf import to_hf_gpt2_state_dict

    model = ckpt.model(device="cpu")
    try:
        sd = to_hf_gpt2_state_dict(model)
    except ValueError as exc:
        raise UserError(f"{ckpt.folder}: cannot export to GPT-2: {exc} (model.* in its config); "
                        "only learned positions, unscaled embeddings and biases map onto GPT2LMHeadModel") from None
    if ckpt.cfg.model.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def export_hf(ckpt: Checkpoint, out: Path, *, force: bool = False, tokenizer_spec: str | None = None) -> Path:
    # torch: safetensors.torch and model.hf import torch; only when exporting
    from safetensors.torch import save_file

    from gptdist.model.hf import hf_config_from

    refuse_unsafe_target(out, ckpt.folder, force)  # before the model is built: a mistaken --hf is refused at once

    try:
        hf_cfg = hf_config_from(ckpt.cfg.model)
    except ValueError as exc:
        raise UserError(f"{ckpt.folder}: cannot export to GPT-2: {exc} (model.* in its config); "
                        "only learned positions, unscaled embeddings and biases map onto GPT2LMHeadModel") from None
    tok = ckpt.tokenizer(tokenizer_spec)  # before anything is written: a wrong tokenizer stops the export
    sd = hf_state_dict(ckpt)
    prepare_out_dir(out, force, ckpt.folder)
    hf_cfg.architectures = ["GPT2LMHeadModel"]
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = tok.eos_id  # GPT-2's convention: one <|endoftext|> for both
    hf_cfg.save_pretrained(str(out))
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    tok.save_hf_files(out)
    (out / "gptdist_export.json").write_text(json.dumps({
        "checkpoint": str(ckpt.folder.resolve()), "step": ckpt.step,
        "config_digest": ckpt.state.get("config_digest"), "tokenizer": tok.identity,
    }, indent=1) + "\n")
    return out

