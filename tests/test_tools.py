"""gptdist.tools: HF export/import, generate and eval, on checkpoints written by import-hf (fast) and by a real
(tp=2, pp=2, dp=2, ZeRO-1) training run under the deepspeed launcher (slow)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptdist.checkpoint.manifest import describe, list_files, read_manifest, size_problems, write_manifest
from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.cli import main
from gptdist.model import GPT
from tests.helpers import ROOT, TINY_MODEL, assert_ok, cpu_env, launch, train_single, write_recipe

transformers = pytest.importorskip("transformers")

STEP0 = "step_00000000"


def run_cli(capsys, *argv: str):
    """(exit status, stdout, stderr) of `gptdist ARGV` run in this process (no interpreter start-up)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptdist: "), err
    return lines[0]


def model_of(checkpoint: Path) -> GPT:
    """gptdist's plain GPT from a checkpoint's layout-free form, independently of gptdist.tools."""
    from gptdist.checkpoint.store import read_state
    from gptdist.config import RunConfig

    cfg = RunConfig.model_validate(read_state(checkpoint)["config"])
    model = GPT(cfg.model, seed=None)
    model.load_state_dict(LayoutFreeReader(checkpoint / "model").state_dict())
    return model.eval()


def rewrite_state(folder: Path, edit) -> None:
    """Edit gptdist_state.json and re-seal the checkpoint (a new manifest), as a run with that config would."""
    state = json.loads((folder / "gptdist_state.json").read_text())
    edit(state)
    (folder / "gptdist_state.json").write_text(json.dumps(state))
    write_manifest(folder, describe(folder, list_files(folder)), state["step"])


# ------------------------------------------------------------------------------ fast: a random small GPT-2


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=32,
                                  bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # fresh biases are 0 and LayerNorms 1; random values make every tensor count
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "gpt2-small-random"
    hf_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus, tokenizer_path) -> Path:
    tmp = tmp_path_factory.mktemp("recipe")
    return write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run")


@pytest.fixture(scope="module")
def imported(hf_dir, recipe, tmp_path_factory) -> Path:
    """A run directory holding the random model as a step-0 checkpoint (import-hf run in this process)."""
    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import-hf", str(hf_dir), "--out", str(run), "--config", str(recipe)]) == 0
    return run


@pytest.fixture()
def heldout(tmp_path, corpus) -> Path:
    """A slice of one play, small enough for a whole pass in well under a second."""
    text = sorted(corpus.glob("*.txt"))[-1].read_text(encoding="utf-8", errors="replace")
    path = tmp_path / "heldout.txt"
    path.write_text(text[20000:26000], encoding="utf-8")
    return path


def test_import_writes_a_complete_checkpoint_training_accepts(imported, recipe, tokenizer_path):
    from gptdist.checkpoint.resume import plan_resume
    from gptdist.config import load_config
    from gptdist.data import load_tokenizer

    folder = imported / "checkpoints" / STEP0
    assert (imported / "checkpoints" / "latest").read_text().strip() == STEP0
    index = json.loads((folder / "model" / "index.json").read_text())
    assert index["tp"] == 1 and index["pp"] == 1
    assert set(index["params"]) == set(dict(GPT(load_config(recipe).model, seed=None).named_parameters()))
    assert all(m == {"partition_dim": None, "stride": 1, "stage": 0} for m in index["params"].values())
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


def test_eval_loss_equals_hand_computation(imported, recipe, tokenizer_path, heldout, capsys):
    from gptdist.data import iter_samples, load_tokenizer
    from gptdist.data.config import DataConfig

    code, out, err = run_cli(capsys, "eval", imported, "--data", heldout, "--batch-size", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    # The same windows the training loader forms from this one source unshuffled, up to the end of one pass.
    data = DataConfig(sources=[str(heldout)], tokenizer=str(tokenizer_path), text_split="paragraph",
                      shuffle_buffer=0)
    seq_len = TINY_MODEL["seq_len"]
    stream = [w for _, (_, w) in zip(range(result["samples"] + 1), iter_samples(data, seq_len=seq_len, seed=0))]
    tok = load_tokenizer(str(tokenizer_path))
    paragraphs = [p for p in heldout.read_text().split("\n\n") if p.strip()]
    assert result["samples"] > 10
    assert abs(result["samples"] - sum(len(tok.encode(p)) + 1 for p in paragraphs) // (seq_len + 1)) <= 1
    windows = torch.tensor(stream[: result["samples"]])
    model = model_of(imported / "checkpoints" / STEP0)
    with torch.no_grad():
        loss = model(windows[:, :-1], windows[:, 1:]).item()
    assert result["tokens"] == result["samples"] * seq_len
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # --max-samples: the first N of the same windows.
    code, out, _ = run_cli(capsys, "eval", imported, "--data", heldout, "--max-samples", "4", "--json")
    with torch.no_grad():
        first4 = model(windows[:4, :-1], windows[:4, 1:]).item()
    assert json.loads(out)["samples"] == 4 and json.loads(out)["loss"] == pytest.approx(first4, rel=1e-5)


def test_generate_json_and_sampling(imported, tokenizer_path, capsys):
    from gptdist.data import load_tokenizer
    from gptdist.model import generate

    tok = load_tokenizer(str(tokenizer_path))
    code, out, err = run_cli(capsys, "generate", imported, "--prompt", "To be, or not", "--max-new-tokens", "8",
                             "--greedy", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"prompt_ids", "ids", "text"}
    assert result["prompt_ids"] == tok.encode("To be, or not")
    assert 1 <= len(result["ids"]) <= 8
    model = model_of(imported / "checkpoints" / STEP0)
    assert result["ids"] == generate(model, result["prompt_ids"], 8, eos_id=tok.eos_id)
    shown = result["ids"][:-1] if result["ids"][-1] == tok.eos_id else result["ids"]
    assert result["text"] == tok.decode(shown)
    # Plain output: the prompt followed by the continuation.
    code, out, _ = run_cli(capsys, "generate", imported, "--prompt", "To be, or not", "--max-new-tokens", "8")
    assert out == "To be, or not" + result["text"] + "\n"
    # Sampling is reproducible with --seed.
    sample = ["generate", imported, "--prompt", "Enter", "--top-k", "20", "--temperature", "1.5", "--seed", "3",
              "--max-new-tokens", "12", "--json"]
    first, second = (json.loads(run_cli(capsys, *sample)[1])["ids"] for _ in range(2))
    assert first == second
    assert "--greedy" in user_error(capsys, "generate", imported, "--prompt", "x", "--greedy", "--top-k", "3")


# ------------------------------------------------------------------------------ fast: each error, one line


def test_resolver_errors_and_newest_complete_checkpoint(imported, tmp_path, capsys):
    assert "no such checkpoint" in user_error(capsys, "generate", tmp_path / "nope", "--prompt", "x")
    run = tmp_path / "run"
    src = imported / "checkpoints" / STEP0
    # A run whose only checkpoint never finished saving.
    shutil.copytree(src, run / "checkpoints" / "step_00000009")
    (run / "checkpoints" / "step_00000009" / "manifest.json").unlink()
    assert "no complete checkpoint" in user_error(capsys, "generate", run, "--prompt", "x")
    assert "incomplete checkpoint" in user_error(capsys, "generate", run / "checkpoints" / "step_00000009",
                                                 "--prompt", "x")
    # An older complete one is what the run (and its checkpoints folder) stands for.
    shutil.copytree(src, run / "checkpoints" / "step_00000005")
    from gptdist.tools.resolve import find_checkpoint

    assert find_checkpoint(run) == run / "checkpoints" / "step_00000005"
    assert find_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000005"
    # A complete checkpoint without the layout-free weights.
    shutil.rmtree(run / "checkpoints" / "step_00000009")
    shutil.rmtree(run / "checkpoints" / "step_00000005" / "model")
    rewrite_state(run / "checkpoints" / "step_00000005", lambda s: None)
    assert "model/index.json" in user_error(capsys, "eval", run, "--data", tmp_path)
    assert "not a run directory" in user_error(capsys, "export", tmp_path, "--hf", tmp_path / "out")


def test_checkpoint_tokenizer_must_resolve_and_match(imported, tmp_path, tokenizer_path, capsys, monkeypatch):
    ckpt = tmp_path / STEP0
    shutil.copytree(imported / "checkpoints" / STEP0, ckpt)
    rewrite_state(ckpt, lambda s: s["config"]["data"].update(tokenizer="tok/tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, "generate", ckpt, "--prompt", "x")
    assert "tok/tokenizer.json" in line and "--tokenizer" in line
    (tmp_path / "tok").mkdir()
    shutil.copy(tokenizer_path, tmp_path / "tok" / "tokenizer.json")  # relative to the current directory
    assert run_cli(capsys, "generate", ckpt, "--prompt", "x", "--max-new-tokens", "2")[0] == 0
    rewrite_state(ckpt, lambda s: s.update(tokenizer="0" * 64))  # trained with another tokenizer
    assert "not the tokenizer" in user_error(capsys, "eval", ckpt, "--data", tmp_path)


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


# ------------------------------------------------------------------------------ slow: a (tp=2, pp=2, dp=2) run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, tokenizer_path):
    tmp = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(tmp / "r.yaml", corpus, tokenizer_path, tmp / "run",
                          train={"steps": 6, "micro_batch_size": 2, "global_batch_size": 8},
                          parallel={"tp": 2, "pp": 2, "zero_stage": 1})
    assert_ok(launch(recipe, ranks=8))
    return recipe, tmp / "run"


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_tools_verify_checksums_of_what_they_read(imported, tmp_path, capsys):
    """The tools and resume share one resolution path (checkpoint/locate.py); the tools also check the SHA-256 of
    the weights they read: a corrupted checkpoint named directly is refused, a run directory falls back past it."""
    from gptdist.tools.resolve import find_checkpoint

    run = tmp_path / "run"
    src = imported / "checkpoints" / STEP0
    shutil.copytree(src, run / "checkpoints" / "step_00000005")
    shutil.copytree(src, run / "checkpoints" / "step_00000009")
    newest = run / "checkpoints" / "step_00000009"
    shard = sorted((newest / "model").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    line = user_error(capsys, "generate", newest, "--prompt", "x")
    assert "damaged checkpoint" in line and "SHA-256" in line, line
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000005"
    assert "step_00000009 is corrupted" in capsys.readouterr().err
