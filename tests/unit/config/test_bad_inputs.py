"""Bad input: each one ends `gptdist train` with exit status 2 and one line naming the key or file and the fix,
before any process group exists, and leaves the run directory exactly as it was; `gptdist check` refuses each with
the same line (both run train/preflight.py)."""

from pathlib import Path

import pytest

from gptdist.cli import main
from tests.unit.config.conftest import refusal, snapshot


def _files(tmp: Path, corpus: Path):
    bad = tmp / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (bad / "empty.txt").write_text("")
    (bad / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    (bad / "ds.json").write_text("{not json")
    (bad / "ds_stage.json").write_text('{"zero_optimization": {"stage": "two"}}')
    (bad / "ds_batch.json").write_text('{"train_batch_size": 3}')
    return bad


# (overrides, words that must appear in the one-line message). {corpus}, {bad}, {run}, {ckpt} are filled in.
CASES = [
    (["train.steps=0"], ["train.steps=0"]),
    (["train.steps=ten"], ["train.steps='ten'", "integer"]),
    (["train.lr=-0.1"], ["train.lr=-0.1", "greater than 0"]),
    (["train.min_lr=1"], ["min_lr", "must not exceed"]),
    (["model.n_layers=3"], ["unknown key model.n_layers", "did you mean model.n_layer"]),
    (["data.tokeniser=x"], ["unknown key data.tokeniser", "did you mean data.tokenizer"]),
    (["parallel.zero_stage=5"], ["parallel.zero_stage=5"]),
    (["parallel.pp=2", "parallel.zero_stage=3"], ["zero_stage=3", "use parallel.zero_stage=1"]),
    (["parallel.tp=2"], ["world size 1", "parallel.tp*parallel.pp"]),
    (["model.n_head=3"], ["d_model=64", "n_head=3"]),
    (["train.global_batch_size=6"], ["train.global_batch_size=6", "micro_batch_size*dp"]),
    (["train.precision=fp16"], ["train.precision=fp16", "needs a GPU"]),
    (["train.precision=fp64"], ["train.precision='fp64'"]),
    (["train.deepspeed_config={bad}/missing.json"], ["train.deepspeed_config", "no such file"]),
    (["train.deepspeed_config={bad}/ds.json"], ["train.deepspeed_config", "not valid JSON"]),
    (["train.deepspeed_config={bad}/ds_stage.json"], ["train.deepspeed_config", "DeepSpeed refuses it", "stage"]),
    (["train.deepspeed_config={bad}/ds_batch.json"],
     ["train.deepspeed_config", "train_batch_size=3", "layout gives 8"]),
    (["parallel.pp=2", "model.tie_embeddings=false", "world=2"], ["parallel.pp=2", "model.tie_embeddings=true"]),
    (["data.sources={bad}/nothing_here.txt"], ["nothing_here.txt"]),
    (["data.sources={bad}/*.parquet"], ["*.parquet"]),
    (["data.sources={bad}/empty.txt"], ["empty.txt"]),
    (["data.sources={bad}/latin1.txt"], ["latin1.txt", "UTF-8"]),
    (["data.sources={bad}/notext.jsonl"], ["notext.jsonl", "line 2", "text"]),
    (["data.tokenizer={bad}/no_tokenizer.json"], ["no_tokenizer.json"]),
    (["data.tokenizer=gpt2"], ["model.vocab_size"]),
    (["data.on_bad_file=ignore"], ["data.on_bad_file='ignore'"]),
    (["model.vocab_size=1024"], ["resume", "model.vocab_size=512", "1024"]),
    (["model.n_layer=3"], ["resume", "model.n_layer=2"]),
    (["resume=never"], ["resume=never", "already holds checkpoints"]),
    (["resume={bad}/no_such_checkpoint", "run.dir={fresh}"], ["no_such_checkpoint", "no such checkpoint"]),
    (["resume={bad}", "run.dir={fresh}"], ["no complete checkpoint"]),
    (["resume={torn}", "run.dir={fresh}"], ["no manifest.json"]),
    (["resume={truncated}", "run.dir={fresh}"], ["damaged", "truncated"]),
    (["tracking.enabled=true", "tracking.uri=http://127.0.0.1:9", "tracking.on_unreachable=fail"],
     ["127.0.0.1:9", "cannot be reached"]),
    (["train.steps"], ["override 'train.steps'", "section.key=value"]),
]


@pytest.mark.parametrize("overrides,words", CASES, ids=[" ".join(o)[:60] for o, _ in CASES])
def test_bad_input(overrides, words, existing_run, tmp_path, corpus, tokenizer_path, capsys):
    run, recipe = existing_run
    bad = _files(tmp_path, corpus)
    checkpoint = run / "checkpoints" / "step_00000002"
    torn = tmp_path / "torn" / "step_00000002"
    truncated = tmp_path / "truncated" / "step_00000002"
    if any("{torn}" in o or "{truncated}" in o for o in overrides):
        import shutil

        shutil.copytree(checkpoint, torn)
        (torn / "manifest.json").unlink()
        shutil.copytree(checkpoint, truncated)
        shard = sorted((truncated / "model").glob("rank*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    # resume=PATH seeds only a run directory without checkpoints of its own: those cases name a new one.
    fill = {"bad": str(bad), "torn": str(torn), "truncated": str(truncated), "run": str(run),
            "fresh": str(tmp_path / "fresh")}
    filled = [o.format(**fill) for o in overrides if not o.startswith("world=")]
    world = next((int(o.split("=")[1]) for o in overrides if o.startswith("world=")), 1)
    before = snapshot(run)
    lines = {}
    for command in ("check", "train"):
        env = {}
        if command == "train" and world > 1:
            # This process as rank 0 of `world`: refused before it would wait for the others.
            env = dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
        extra = ["--world", str(world)] if command == "check" else []
        lines[command] = refusal(command, recipe, filled, capsys, env, extra)
    assert lines["check"] == lines["train"]
    for word in words:
        assert word in lines["train"], lines["train"]
    assert snapshot(run) == before
    assert not (tmp_path / "fresh").exists()


def test_unknown_config_file(capsys):
    assert main(["train", "configs/no-such-recipe.yaml"]) == 2
    assert "configs/no-such-recipe.yaml not found" in capsys.readouterr().err
