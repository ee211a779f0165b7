"""import-hf and export: transformers' GPT-2 in, the same tensors and logits out; what GPT-2 cannot express refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.checkpoint.manifest import read_manifest, size_problems
from gptdist.model import GPT
from tests.tools_helpers import STEP0, rewrite_state, run_cli, user_error

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------ fast: a random small GPT-2













def test_import_writes_a_complete_checkpoint_training_accepts(imported, recipe, tokenizer_path):
    from gptdist.checkpoint.resume import plan_resume
    from gptdist.config import load_config
    from gptdist.data import load_tokenizer

    folder = imported / "checkpoints" / STEP0
    assert (imported / "checkpoints" / "latest").read_text().strip() == STEP0
    index = json.loads((folder / "model" / "index.json").read_text())
    model = dict(GPT(load_config(recipe).model, seed=None).named_parameters())
    assert index["format"] == 2 and index["tp"] == 1 and set(index["params"]) == set(model)
    for name, entry in index["params"].items():  # each parameter whole, in one fragment of one file
        assert (entry["partition_dim"], entry["stride"], entry["shape"]) == (None, 1, list(model[name].shape))
        assert entry["fragments"] == [[0, 0, model[name].numel(), "model/rank00000.safetensors"]]
    state = json.loads((folder / "gptdist_state.json").read_text())
    tok = load_tokenizer(str(tokenizer_path))
    assert (state["step"], state["data_state"], state["mlflow_run_id"], state["layout"]) == (0, {}, None, None)
    assert state["tokenizer"] == tok.identity and state["config"]["model"]["vocab_size"] == 512
    assert size_problems(folder, read_manifest(folder)) == []
    # What `gptdist train RECIPE resume=RUN` decides before any rank starts: this checkpoint, compatible.
    cfg = load_config(recipe, [f"resume={imported}"])
    assert plan_resume(cfg, tok.identity, print) == [folder]


def test_export_gives_back_the_hf_tensors_and_logits(imported, hf_model, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, err = run_cli(capsys, "export", imported, "--hf", out)
    assert code == 0, err
    assert STEP0 in stdout
    exported = load_file(str(out / "model.safetensors"))
    original = hf_model.state_dict()
    assert set(exported) == {k for k in original if k != "lm_head.weight"}  # tied, as save_pretrained writes
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok2("To be, or not to be")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(hf2(torch.tensor([ids])).logits, hf_model(torch.tensor([ids])).logits, atol=1e-5)
    # Export refuses a non-empty directory unless --force.
    assert "--force" in user_error(capsys, "export", imported, "--hf", out)
    assert run_cli(capsys, "export", imported, "--hf", out, "--force")[0] == 0


def test_import_reads_pytorch_model_bin(hf_model, hf_dir, recipe, tmp_path):
    from gptdist.tools.import_hf import import_hf

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(hf_dir / "config.json", bin_dir)
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    folder = import_hf(bin_dir, tmp_path / "ckpt" / "step_00000000", str(recipe))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == STEP0
    ours = LayoutFreeReader(folder / "model").state_dict()
    theirs = hf_model.state_dict()
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], theirs["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(ours["embed.wte.weight"], theirs["transformer.wte.weight"])


def test_import_refuses_a_pickle_where_torch_is_older_than_2_6(hf_model, hf_dir, recipe, tmp_path, capsys,
                                                                monkeypatch):
    """CVE-2025-32434: torch <= 2.5.1 runs code from a pickle despite weights_only=True."""
    from gptdist.tools.import_hf import pickle_loading_is_safe

    assert not pickle_loading_is_safe("2.5.1+cu124") and not pickle_loading_is_safe("2.4.0")
    assert pickle_loading_is_safe("2.6.0") and pickle_loading_is_safe("2.10.1+cpu")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(hf_dir / "config.json", bin_dir)
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    line = user_error(capsys, "import-hf", bin_dir, "--out", tmp_path / "run", "--config", recipe)
    assert "CVE-2025-32434" in line and "model.safetensors" in line and "torch>=2.6" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_refuses_what_gpt2_cannot_express(imported, tmp_path, capsys):
    ckpt = tmp_path / STEP0
    shutil.copytree(imported / "checkpoints" / STEP0, ckpt)
    rewrite_state(ckpt, lambda s: s["config"]["model"].update(pos_embedding="sinusoidal"))
    line = user_error(capsys, "export", ckpt, "--hf", tmp_path / "out")
    assert "sinusoidal" in line and not (tmp_path / "out").exists()


def test_import_errors(hf_dir, recipe, tmp_path, imported, capsys):
    out = ["--out", tmp_path / "run", "--config", recipe]
    line = user_error(capsys, "import-hf", hf_dir, *out, "model.vocab_size=1024")
    assert "model.vocab_size=1024" in line and "512" in line
    assert "config.json" in user_error(capsys, "import-hf", tmp_path, *out)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_dir / "config.json", no_weights)
    assert "model.safetensors" in user_error(capsys, "import-hf", no_weights, *out)
    assert "no-such-tokenizer.json" in user_error(capsys, "import-hf", hf_dir, *out,
                                                  "data.tokenizer=no-such-tokenizer.json")
    run = tmp_path / "again"
    shutil.copytree(imported, run)
    line = user_error(capsys, "import-hf", hf_dir, "--out", run, "--config", recipe)
    assert "--force" in line
    assert run_cli(capsys, "import-hf", hf_dir, "--out", run, "--config", recipe, "--force")[0] == 0
    # Next to a later checkpoint a step-0 import would never be resumed from: refused.
    shutil.copytree(run / "checkpoints" / STEP0, run / "checkpoints" / "step_00000010")
    assert "already holds checkpoints" in user_error(capsys, "import-hf", hf_dir, "--out", run, "--config", recipe,
                                                     "--force")
