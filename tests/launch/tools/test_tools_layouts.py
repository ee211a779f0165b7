"""The tools on checkpoints written by real multi-rank runs: export of a tp x pp x dp run equals transformers, and
training resumes from an imported checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, assert_ok, cpu_env, launch, train_single, write_recipe
from tests.tools_helpers import STEP0, model_of, run_cli

transformers = pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, tokenizer_path):
    tmp = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run",
                          train={"steps": 6, "micro_batch_size": 2, "global_batch_size": 8},
                          parallel={"tp": 2, "pp": 2, "zero_stage": 1})
    assert_ok(launch(recipe, ranks=8))
    return recipe, tmp / "run"


def test_export_of_a_tp_pp_dp_run_matches_transformers(trained, tmp_path, capsys):
    recipe, run = trained
    checkpoint = run / "checkpoints" / "step_00000006"
    assert json.loads((checkpoint / "gptdist_state.json").read_text())["layout"]["dp"] == 2
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", run, "--hf", out)[0] == 0

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = model_of(checkpoint)
    ids = torch.tensor([tok("ROMEO: But soft, what light through yonder window breaks?")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-5

    # import -> export gives the same tensors again.
    assert run_cli(capsys, "import-hf", out, "--out", tmp_path / "back", "--config", recipe)[0] == 0
    assert run_cli(capsys, "export", tmp_path / "back", "--hf", tmp_path / "hf2")[0] == 0
    first, second = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # Greedy decoding: the real `gptdist generate` command and transformers agree token for token.
    prompt = "ROMEO: But soft"
    proc = subprocess.run([sys.executable, "-m", "gptdist.cli", "generate", str(run), "--prompt", prompt,
                           "--greedy", "--json", "--max-new-tokens", "12"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    result = json.loads(proc.stdout)
    prompt_ids = tok(prompt)["input_ids"]
    assert result["prompt_ids"] == prompt_ids
    reference = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=12, do_sample=False, pad_token_id=hf.config.eos_token_id)
    assert result["ids"] == reference[0, len(prompt_ids):].tolist()


def test_training_resumes_from_an_imported_checkpoint(trained, tmp_path, capsys):
    """`gptdist train RECIPE resume=IMPORTED` starts from the imported weights at the first sample: its first
    loss is the model's loss on the first global batch of the training stream."""
    from gptdist.config import load_config
    from gptdist.data import iter_samples
    from gptdist.telemetry.metrics_file import read_metrics

    recipe, run = trained
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", run, "--hf", out)[0] == 0
    imported = tmp_path / "imported"
    assert run_cli(capsys, "import-hf", out, "--out", imported, "--config", recipe)[0] == 0
    one_rank = ["parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=0"]
    assert_ok(train_single(recipe, [f"resume={imported}", f"run.dir={tmp_path / 'run2'}", "train.steps=1", *one_rank]))
    first = read_metrics(tmp_path / "run2" / "metrics.jsonl")[0]

    cfg = load_config(recipe)
    batch = torch.tensor([w for _, (_, w) in zip(range(8), iter_samples(cfg.data, seq_len=cfg.model.seq_len,
                                                                     seed=cfg.train.seed))])
    with torch.no_grad():
        expected = model_of(imported / "checkpoints" / STEP0)(batch[:, :-1], batch[:, 1:]).item()
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-4)
