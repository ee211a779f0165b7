"""eval, generate and the checkpoint resolver on an imported checkpoint: losses by hand, sampling, each mistake in
one line, checksums verified."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.helpers import TINY_MODEL
from tests.tools_helpers import STEP0, model_of, rewrite_state, run_cli, user_error

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------ fast: a random small GPT-2


















def test_eval_loss_equals_hand_computation(imported, recipe, tokenizer_path, heldout, capsys):
    from gptdist.data import iter_samples, load_tokenizer
    from gptdist.data.config import DataConfig

    code, out, err = run_cli(capsys, "eval", imported, "--data", heldout, "--batch-size", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    # The same windows the training loader forms from this one source unshuffled, up to the end of one pass.
    data = DataConfig(sources=[str(heldout)], tokenizer=str(tokenizer_path), text_split="paragraph",
                      shuffle_buffer=0, window_shuffle=0)
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
    # --max-samples: N of the same windows, evenly strided over the whole source (not its first N).
    code, out, _ = run_cli(capsys, "eval", imported, "--data", heldout, "--max-samples", "4", "--json")
    n = result["samples"]
    picks = [j * n // 4 for j in range(4)]
    assert picks[-1] >= n // 2
    with torch.no_grad():
        spread = model(windows[picks, :-1], windows[picks, 1:]).item()
    assert json.loads(out)["samples"] == 4 and json.loads(out)["loss"] == pytest.approx(spread, rel=1e-5)


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
    assert "checkpoint is incomplete (no manifest.json" in user_error(capsys, "generate",
                                                                      run / "checkpoints" / "step_00000009",
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






# ------------------------------------------------------------------------------ slow: a (tp=2, pp=2, dp=2) run








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
