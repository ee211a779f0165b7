"""`gptdist import-hf HF_DIR --out CHECKPOINT_OR_RUN`: a local GPT-2 directory as a gptdist checkpoint that
`gptdist train CONFIG resume=OUT` starts from (fine-tuning, or continued pre-training, in any layout).

The checkpoint holds only what a resume into another layout reads: the layout-free weights (no Adam moments:
the optimizer starts fresh), gptdist_state.json at step 0 with no data position, and the manifest that makes it
complete. Nothing is downloaded: HF_DIR must hold config.json and the weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from gptdist.checkpoint.checkpointer import FORMAT
from gptdist.checkpoint.layout_free import build_index, tensor_key
from gptdist.checkpoint.manifest import (
    LATEST,
    STATE_FILE,
    describe,
    fsync_dir,
    list_files,
    write_atomically,
    write_durably,
    write_manifest,
)
from gptdist.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from gptdist.checkpoint.store import checkpoint_root, list_checkpoints, tag_for
from gptdist.config import RunConfig, load_config
from gptdist.data import load_tokenizer
from gptdist.errors import UserError
from gptdist.model import GPT
from gptdist.model.hf import config_from_hf, load_hf_gpt2_state_dict

_TAG = re.compile(r"^step_\d{8,}$")
# The recipe's value wins for these: they do not change what the weights compute, and `gptdist train` compares
# the rest of model.* between its recipe and the checkpoint.
_RECIPE_WINS = ("dropout", "init_std")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")


# ------------------------------------------------------------------------------------------------ reading HF_DIR


def read_hf_config(hf_dir: Path):
    # transformers: slow to import, only when a Hugging Face config is read
    from transformers import GPT2Config

    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json; import-hf reads a local GPT-2 directory (save_pretrained's output)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if raw.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type={raw.get('model_type')!r}; only GPT-2 (model_type 'gpt2') can be imported")
    return GPT2Config.from_dict(raw)


def pickle_loading_is_safe(torch_version: str) -> bool:
    """torch.load(weights_only=True) refuses code only from torch 2.6 on (CVE-2025-32434 in <= 2.5.1)."""
    found = re.match(r"(\d+)\.(\d+)", torch_version)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (2, 6)


def read_hf_weights(hf_dir: Path) -> Dict[str, Any]:
    """The state dict from model.safetensors, pytorch_model.bin, or their sharded *.index.json forms."""
    def load(path: Path) -> Dict[str, Any]:
        if path.suffix == ".safetensors":
            # gptdist's reader: the header is checked against the file's size before any tensor is allocated.
            file = SafetensorsFile(path)
            return {name: file.read(name) for name in file.keys()}
        if not pickle_loading_is_safe(torch.__version__):
            raise UserError(f"{path}: a .bin file is a pickle, and torch {torch.__version__} can run code from one "
                            "even with weights_only=True (CVE-2025-32434); use the model's model.safetensors, or "
                            "install torch>=2.6")
        try:  # weights_only: a .bin is a pickle, and a downloaded pickle must not run code
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is not plain tensors
            raise UserError(f"{path}: cannot be read as plain tensors ({str(exc).splitlines()[0]}); "
                            "convert it to model.safetensors") from None

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return load(hf_dir / name)
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: Dict[str, Any] = {}
            for file in files:
                sd.update(load(hf_dir / file))
            return sd
    raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


# ------------------------------------------------------------------------------------------------ the run config


def build_run_config(hf_cfg, hf_dir: Path, recipe: Optional[str], overrides: Sequence[str]):
    """Recipe + overrides, with model.* from the HF config; a shape the recipe states differently is an error."""
    where = recipe or "the overrides"
    cfg = load_config(recipe, overrides)
    try:
        hf_model = config_from_hf(hf_cfg)
    except ValueError as exc:
        raise UserError(f"{hf_dir / 'config.json'}: {exc}; gptdist cannot represent this model") from None
    model = hf_model.model_dump()
    for key in cfg.model.model_fields_set:  # only what the recipe or an override actually states
        ours, theirs = getattr(cfg.model, key), model[key]
        if key in _RECIPE_WINS:
            model[key] = ours
        elif key == "d_ff" and cfg.model.ffn_dim == hf_model.ffn_dim:
            model[key] = ours  # 4*d_model spelled out: the same model, and the stored config matches the recipe
        elif ours != theirs:
            raise UserError(f"model.{key}={ours!r} in {where}, but {hf_dir / 'config.json'} has {theirs!r} "
                            f"(GPT-2's {_hf_name(key)}); remove model.{key} or set it to {theirs!r}")
    data = cfg.to_dict()
    data["model"] = model
    if "tokenizer" not in cfg.data.model_fields_set and any((hf_dir / n).is_file() for n in _TOKENIZER_FILES):
        data["data"]["tokenizer"] = str(hf_dir.resolve())  # the model's own tokenizer, when no recipe names one
    return RunConfig.model_validate(data)


def _hf_name(key: str) -> str:
    return {"n_layer": "n_layer", "n_head": "n_head", "d_model": "n_embd", "d_ff": "n_inner",
            "vocab_size": "vocab_size", "seq_len": "n_positions", "activation": "activation_function",
            "tie_embeddings": "tie_word_embeddings", "layer_norm_eps": "layer_norm_epsilon"}.get(key, key)


# ------------------------------------------------------------------------------------------------ the checkpoint


def target_folder(out: Path) -> Path:
    """OUT ending in step_XXXXXXXX is the checkpoint folder itself; anything else is a run directory."""
    if _TAG.match(out.name):
        return out
    return checkpoint_root(out) / tag_for(0)


def prepare_target(folder: Path, force: bool, *, alone: bool) -> None:
    """Empty the checkpoint folder to write (only with force); with `alone`, refuse a run that has others."""
    others = [f.name for _, f in list_checkpoints(folder.parent) if f != folder]
    if others and alone:
        # resume picks a run's newest complete checkpoint: a step-0 import next to later ones would be ignored
        raise UserError(f"{folder.parent} already holds checkpoints ({', '.join(others[:3])}); "
                        "import into a new run directory, or name the step_* folder to write")
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise UserError(f"{folder} already exists and is not empty; pass --force to replace it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def write_weights(model, folder: Path) -> None:
    """The layout-free form of a one-rank (tp=1, pp=1) save, weights only: each parameter one whole fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, pieces, fragments = {}, {}, []
    for name, p in model.named_parameters():
        tensors[tensor_key("weight", name, 0)] = p.detach().float().cpu().reshape(-1).contiguous()
        pieces[name] = {"shape": list(p.shape), "partition_dim": None, "stride": 1, "stage": 0}
        fragments.append((name, 0, p.numel()))
    write_safetensors(folder / "rank00000.safetensors", tensors)
    index = build_index(1, [("model/rank00000.safetensors", pieces, fragments)], [0])
    write_durably(folder / "index.json", json.dumps(index).encode())
    fsync_dir(folder)


def import_hf(hf_dir: Path, out: Path, recipe: Optional[str] = None, overrides: Sequence[str] = (),
              force: bool = False) -> Path:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: no such directory; import-hf reads a local GPT-2 directory (never downloads)")
    hf_cfg = read_hf_config(hf_dir)
    cfg = build_run_config(hf_cfg, hf_dir, recipe, overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"data.tokenizer={cfg.data.tokenizer!r} has {tok.vocab_size} ids but the model's vocab_size "
                        f"is {cfg.model.vocab_size}; use the tokenizer the model was trained with")
    model = GPT(cfg.model, seed=None)
    try:
        load_hf_gpt2_state_dict(model, read_hf_weights(hf_dir))
    except (KeyError, ValueError) as exc:
        raise UserError(f"{hf_dir}: the weights do not fit its config.json: {exc.args[0]}") from None

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a run directory or a step_XXXXXXXX checkpoint folder")
    folder = target_folder(out)
    prepare_target(folder, force, alone=folder != out)
    write_weights(model, folder / "model")
    state: Dict[str, Any] = {
        "format": FORMAT, "step": 0, "data_state": {}, "config": cfg.to_dict(), "config_digest": cfg.digest(),
        "tokenizer": tok.identity, "mlflow_run_id": None, "layout": None, "optimizer": None,
        "imported_from": str(hf_dir.resolve()),
    }
    write_durably(folder / STATE_FILE, json.dumps(state, indent=1).encode())
    fsync_dir(folder)
    write_manifest(folder, describe(folder, list_files(folder)), 0)  # last: the checkpoint is complete
    write_atomically(folder.parent / LATEST, folder.name + "\n")
    return folder


def summary(folder: Path) -> List[str]:
    return [f"gptdist: imported into {folder}",
            f"gptdist: continue training with: gptdist train CONFIG resume={folder}"]
