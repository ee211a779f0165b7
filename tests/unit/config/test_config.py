"""The run config: YAML + dotted overrides, and one clear line for each bad value."""

from pathlib import Path

import pytest

from gptdist.config import load_config
from gptdist.errors import UserError
from gptdist.parallel.layout import Layout

ROOT = Path(__file__).resolve().parents[3]


def test_recipes_load_and_overrides_apply():
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(recipe)
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.steps=7", "parallel.zero_stage=3", "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.parallel.zero_stage == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.run.dir == "runs/tiny-cpu"


def test_run_dir_defaults_to_recipe_name(tmp_path):
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert load_config(recipe).run.dir == "runs/my-recipe"


def test_digest_follows_values():
    a = load_config(None, ["train.steps=5"])
    assert a.digest() == load_config(None, ["train.steps=5"]).digest()
    assert a.digest() != load_config(None, ["train.steps=6"]).digest()


BAD_VALUES = [
    (["eval.every=5"], ["eval.every=5 needs eval.data", "held-out source"]),
    (["eval.data=[a.txt,b.txt]"], ["eval.data", "holds 2 sources"]),
    (["eval.max_samples=0"], ["eval.max_samples=0"]),
    (["train.steps=0"], ["train.steps=0", "greater than or equal to 1"]),
    (["train.steps=many"], ["train.steps='many'", "integer"]),
    (["train.lr=-1"], ["train.lr=-1", "greater than 0"]),
    (["train.lr=1e-4", "train.min_lr=1e-3"], ["min_lr", "must not exceed"]),
    (["train.precision=fp8"], ["train.precision='fp8'", "'auto', 'fp32', 'bf16' or 'fp16'"]),
    (["train.beta2=1.5"], ["train.beta2=1.5", "less than 1"]),
    (["parallel.zero_stage=4"], ["parallel.zero_stage=4", "less than or equal to 3"]),
    (["parallel.pp=2", "parallel.zero_stage=2"], ["zero_stage=2", "pp=2", "use parallel.zero_stage=1"]),
    (["parallel.tp=0"], ["parallel.tp=0", "greater than or equal to 1"]),
    (["model.n_head=5"], ["d_model=768", "divisible by n_head=5"]),
    (["model.dropout=1.0"], ["model.dropout=1.0", "less than 1"]),
    (["model.activation=swish"], ["model.activation='swish'", "gelu_tanh"]),
    (["model.n_layers=4"], ["unknown key model.n_layers", "did you mean model.n_layer"]),
    (["trian.steps=3"], ["unknown key trian", "did you mean train"]),
    (["data.on_bad_file=ignore"], ["data.on_bad_file='ignore'", "'fail' or 'skip'"]),
    (["data.shuffle_buffer=-1"], ["data.shuffle_buffer=-1", "greater than or equal to 0"]),
    (["checkpoint.keep=0"], ["checkpoint.keep=0", "greater than or equal to 1"]),
    (["tracking.on_unreachable=maybe"], ["tracking.on_unreachable='maybe'", "'warn' or 'fail'"]),
    (["steps"], ["override 'steps'", "section.key=value"]),
    (["train.steps=5", "train.steps.max=3"], ["train.steps.max=3", "steps is a value, not a section"]),
]


@pytest.mark.parametrize("overrides,words", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_gives_one_line_naming_the_key(overrides, words):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="line .* is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(listed)


LAYOUT_ERRORS = [
    (3, ["parallel.tp=2"], "world size 3 is not a multiple of parallel.tp*parallel.pp"),
    (2, ["parallel.tp=2", "model.n_head=3", "model.d_model=96"], "model.n_head=3 is not divisible by parallel.tp=2"),
    (2, ["parallel.tp=2", "model.vocab_size=101"], "model.vocab_size=101 is not divisible by parallel.tp=2"),
    (2, ["parallel.pp=2", "model.n_layer=1"], "model.n_layer=1 is smaller than parallel.pp=2"),
    (2, ["train.micro_batch_size=4", "train.global_batch_size=12"],
     "not a multiple of train.micro_batch_size*dp = 4*2"),
]


@pytest.mark.parametrize("world,overrides,text", LAYOUT_ERRORS)
def test_layout_errors(world, overrides, text):
    with pytest.raises(UserError) as info:
        Layout.resolve(load_config(None, overrides), world)
    assert text in str(info.value)


def test_layout_arithmetic():
    layout = Layout.resolve(load_config(None, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2",
                                               "train.global_batch_size=16", "parallel.zero_stage=1"]), 8)
    assert (layout.dp, layout.grad_accum, layout.global_batch_size, layout.world_size) == (2, 4, 16, 8)


def test_overrides_may_follow_options(capsys):
    from gptdist.cli import main

    assert main(["check", "configs/tiny-cpu.yaml", "--world", "2", "parallel.zero_stage=2", "train.steps=5"]) == 0
    assert "zero=2" in capsys.readouterr().out
    assert main(["check", "configs/tiny-cpu.yaml", "--world", "3", "parallel.tp=2"]) == 2
    assert "world size 3" in capsys.readouterr().err
