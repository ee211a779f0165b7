"""The second gauntlet: more mistaken and hostile inputs, each refused by `gptdist check` and `gptdist train` alike
with exit status 2 and one line under 300 characters naming the key or file, no traceback, and the run directory
untouched. Values that are not finite, paths that cannot be written, checkpoints that do not fit the config or are
damaged, launcher variables, and YAML that hides a mistake (duplicate keys, anchors)."""

import json
import shutil
from pathlib import Path

import pytest

from gptdist.cli import main
from tests.unit.config.conftest import refusal, snapshot

# (overrides, environment, words the line must hold). {run}, {file}, {fresh}, {corpus}, {nostate}, {flipped},
# {cache}, {long} (a path too long for the file system), {ckfile}, {latestdir} are filled in; "world=N" is
# `check --world N`, and for `train` WORLD_SIZE=N.
CASES = [
    (["train.lr=.inf"], {}, ["train.lr=inf", "finite"]),
    (["train.lr=.nan"], {}, ["train.lr=nan", "finite"]),
    (["tracking.flush_timeout_s=.inf"], {}, ["tracking.flush_timeout_s=inf", "finite"]),
    (["tracking.system_metrics_interval_s=.inf"], {}, ["tracking.system_metrics_interval_s", "finite"]),
    (["data.hub_backoff_s=.inf"], {}, ["data.hub_backoff_s=inf", "finite"]),
    (["model.dropout=.nan"], {}, ["model.dropout=nan", "finite"]),
    (["model.init_std=.inf"], {}, ["model.init_std=inf", "finite"]),
    (["train.peak_flops=.inf"], {}, ["train.peak_flops=inf", "finite"]),
    (["train.weight_decay=-.inf"], {}, ["train.weight_decay=-inf", "finite"]),
    (["data.sources=[{{path: {corpus}, weight: .inf}}]"], {}, ["data.sources.0.weight", "finite"]),
    (["model.seq_len=1000000000"], {}, ["model.seq_len=1000000000", "less than or equal to 1048576"]),
    (["train.steps=99999999999999999999"], {}, ["train.steps=99999999999999999999", "less than or equal"]),
    (["train.beta1=1"], {}, ["train.beta1=1", "less than 1"]),
    (["train.grad_clip=-1"], {}, ["train.grad_clip=-1"]),
    (["train.micro_batch_size=0"], {}, ["train.micro_batch_size=0"]),
    (["train.steps=1.5"], {}, ["train.steps=1.5"]),
    (["checkpoint.keep=0"], {}, ["checkpoint.keep=0"]),
    (["model.n_head=0"], {}, ["model.n_head=0"]),
    (["model.layer_norm_eps=0"], {}, ["model.layer_norm_eps=0"]),
    (["train.decay=exp"], {}, ["train.decay='exp'"]),
    (["tracking.on_unreachable=maybe"], {}, ["tracking.on_unreachable='maybe'"]),
    (["data.cache_scope=world"], {}, ["data.cache_scope='world'"]),
    (["foo.bar=1"], {}, ["unknown key foo"]),
    (["=3"], {}, ["override '=3'", "section.key=value"]),
    (["train.steps=" + "[" * 5000 + "]" * 5000], {}, ["override train.steps=", "too deeply"]),
    (["train={{steps: 3, steps: 4}}"], {}, ["override train=", "key 'steps' is given twice"]),
    (["train.steps=&a 3"], {}, ["override train.steps=", "anchors"]),
    (["run.dir=/proc/x"], {}, ["run.dir=/proc/x", "cannot be created"]),
    (["run.dir={file}"], {}, ["run.dir=", "existing file"]),
    (["run.dir={file}/sub"], {}, ["run.dir=", "is a file, not a folder"]),
    (["data.cache=/proc/x"], {}, ["data.cache=/proc/x", "cannot be created"]),
    (["data.cache={file}"], {}, ["data.cache=", "existing file"]),
    (["data.cache={cache}"], {}, ["data.cache=", "index", "existing file"]),
    (["run.dir={long}"], {}, ["run.dir=/tmp/aaa", "not a usable path"]),
    (["data.cache={long}"], {}, ["data.cache=/tmp/aaa", "not a usable path"]),
    (["data.sources={long}.txt"], {}, ["data.sources[0].path='/tmp/aaa", "no such file"]),
    (["data.sources={long}/*.txt"], {}, ["data.sources[0].path='/tmp/aaa", "matches nothing"]),
    (["data.tokenizer={long}"], {}, ["data.tokenizer='/tmp/aaa", "not a usable path"]),
    (["train.deepspeed_config={long}"], {}, ["train.deepspeed_config='/tmp/aaa", "no such file"]),
    (["data.sources=/proc/self/mem"], {}, ["/proc/self/mem", "cannot be read"]),
    (["tracking.enabled=true", "tracking.uri=http://[::1"], {}, ["tracking.uri='http://[::1'", "not a valid URI"]),
    (["tracking.enabled=true", "tracking.uri=http://h:99999"], {}, ["Port out of range", "not a valid URI"]),
    (["tracking.enabled=true", "tracking.uri=http://"], {}, ["names no host"]),
    (["run.dir={ckfile}"], {}, ["checkpoints is a file", "another run.dir"]),
    (["run.dir={latestdir}"], {}, ["latest is not a file", "remove it"]),
    (["train.seed=9"], {}, ["train.seed=7", "resume with train.seed=7"]),
    (["data.text_split=line"], {}, ["data section", "changed since the checkpoint"]),
    (["data.shuffle_buffer=16"], {}, ["data section", "restore the data section"]),
    (["train.steps=1"], {}, ["step 2", "past train.steps=1", "train.steps"]),
    (["model.seq_len=16"], {}, ["model.seq_len=32", "16"]),
    (["model.d_model=128"], {}, ["model.d_model=64", "128"]),
    (["resume={nostate}", "run.dir={fresh}"], {}, ["no step or config", "earlier checkpoint"]),
    (["resume={flipped}", "run.dir={fresh}"], {}, ["gptdist_state.json", "SHA-256"]),
    (["resume={file}", "run.dir={fresh}"], {}, ["is a file", "step_*"]),
    ([], {"GPTDIST_FAULTS": "kill@ten"}, ["GPTDIST_FAULTS='kill@ten'", "whole numbers"]),
    ([], {"GPTDIST_FAULTS": "explode@3"}, ["GPTDIST_FAULTS", "unknown drill 'explode'"]),
    ([], {"GPTDIST_FAULTS": "kill@3:node=1"}, ["GPTDIST_FAULTS", "':rank=R'"]),
    (["world=0"], {}, ["0", ">= 1"]),
    (["world=-2"], {}, ["-2", ">= 1"]),
]

# Only `gptdist train` reads the launcher's variables (`check` runs before any launcher).
TRAIN_ENV = [
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'", "whole number"]),
    ({"RANK": "0", "WORLD_SIZE": "two"}, ["WORLD_SIZE='two'", "whole number"]),
    ({"RANK": "3", "WORLD_SIZE": "2"}, ["RANK=3", "not below"]),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, ["LOCAL_RANK='-1'", ">= 0"]),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "0"}, ["LOCAL_WORLD_SIZE='0'", ">= 1"]),
]

ANCHORS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
# (YAML text appended to or replacing the recipe, words). A recipe is read before anything else.
RECIPES = [
    ("train:\n  steps: 9\n", ["line", "key 'train' is given twice", "first on line"]),
    ("=model:\n  n_layer: 2\n  n_layer: 3\n", ["line 3", "key 'n_layer' is given twice"]),
    ("=" + ANCHORS, ["line 1", "anchors"]),
    ("=x: &one 3\ny: *one\n", ["anchors (&one)"]),
    ("=- train\n- model\n", ["must hold a mapping", "list"]),
    ("=train: [steps: 3\n", ["is not valid YAML"]),
    ("=train:\n\tsteps: 3\n", ["is not valid YAML"]),
    ("=train: " + "[" * 5000 + "]" * 5000 + "\n", ["too deeply"]),
    ("=train: !!python/object:os.system {}\n", ["is not valid YAML", "python/object"]),
]


def _damaged(tmp: Path, checkpoint: Path):
    """Copies of a good checkpoint: one whose state has no `config` (manifest updated to match), one with a byte of
    its state flipped."""
    from gptdist.checkpoint.manifest import describe

    nostate = tmp / "nostate" / checkpoint.name
    shutil.copytree(checkpoint, nostate)
    state = json.loads((nostate / "gptdist_state.json").read_text())
    del state["config"]
    (nostate / "gptdist_state.json").write_text(json.dumps(state))
    manifest = json.loads((nostate / "manifest.json").read_text())
    manifest["files"].update(describe(nostate, ["gptdist_state.json"]))
    (nostate / "manifest.json").write_text(json.dumps(manifest))
    flipped = tmp / "flipped" / checkpoint.name
    shutil.copytree(checkpoint, flipped)
    data = bytearray((flipped / "gptdist_state.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "gptdist_state.json").write_bytes(bytes(data))
    return nostate, flipped


@pytest.mark.parametrize("overrides,env,words", CASES, ids=[" ".join(o)[:50] or str(e) for o, e, _ in CASES])
def test_bad_input(overrides, env, words, existing_run, tmp_path, corpus, capsys):
    run, recipe = existing_run
    (tmp_path / "a-file").write_text("not a folder\n")
    nostate, flipped = _damaged(tmp_path, run / "checkpoints" / "step_00000002")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index").write_text("a file where the cache keeps a folder\n")
    (tmp_path / "ckfile").mkdir()
    (tmp_path / "ckfile" / "checkpoints").write_text("not a folder\n")
    (tmp_path / "latestdir" / "checkpoints" / "latest").mkdir(parents=True)
    fill = {"ckfile": tmp_path / "ckfile", "latestdir": tmp_path / "latestdir",
            "run": run, "file": tmp_path / "a-file", "fresh": tmp_path / "fresh", "corpus": corpus,
            "nostate": nostate, "flipped": flipped, "cache": cache, "long": "/tmp/" + "a" * 5000}
    filled = [o.format(**fill) for o in overrides if not o.startswith("world=")]
    world = next((o.split("=")[1] for o in overrides if o.startswith("world=")), None)
    before = snapshot(run)
    check = refusal("check", recipe, filled, capsys, env, ["--world", world] if world else [])
    train_env = dict(env, RANK="0", WORLD_SIZE=world, LOCAL_RANK="0") if world else env
    train = refusal("train", recipe, filled, capsys, train_env)
    if world is None:
        assert check == train
    for word in words:
        assert word in check and word in train, (check, train)
    assert snapshot(run) == before
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("env,words", TRAIN_ENV, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in TRAIN_ENV])
def test_bad_launcher_environment(env, words, existing_run, capsys):
    run, recipe = existing_run
    before = snapshot(run)
    line = refusal("train", recipe, [], capsys, env)
    for word in words:
        assert word in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize("text,words", RECIPES, ids=[t[:30] for t, _ in RECIPES])
def test_bad_recipe(text, words, existing_run, tmp_path, capsys):
    run, recipe = existing_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(text[1:] if text.startswith("=") else recipe.read_text() + text)
    before = snapshot(run)
    lines = [refusal(command, bad, [], capsys) for command in ("check", "train")]
    assert lines[0] == lines[1]
    for word in words:
        assert word in lines[0], lines[0]
    assert "bad.yaml" in lines[0]
    assert snapshot(run) == before


def test_damaged_newest_checkpoint_falls_back_with_a_line(existing_run, tmp_path, capsys):
    """A byte flipped in the newest checkpoint's state, or a state without `config`: `check` passes over it to the
    older good one, saying so in a line, never with a traceback."""
    run, recipe = existing_run
    for damage in ("flip", "no-config"):
        copy = tmp_path / damage
        shutil.copytree(run, copy)
        newest = copy / "checkpoints" / "step_00000002"
        nostate, flipped = _damaged(tmp_path / f"{damage}-src", newest)
        shutil.rmtree(newest)
        shutil.copytree(flipped if damage == "flip" else nostate, newest)
        assert main(["check", str(recipe), f"run.dir={copy}"]) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        assert "step_00000002 is damaged" in captured.err and "skipping it" in captured.err, captured.err
        assert "is valid for 1 rank" in captured.out
