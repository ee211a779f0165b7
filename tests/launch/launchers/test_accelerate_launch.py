"""`accelerate launch -m gptdist.cli train` for real, on one machine.

The same layouts as under the deepspeed launcher give bitwise-equal losses, with accelerate's settings (from a config
file in a temporary HF_HOME, so no personal default config is read) being the ones trained with; the launcher is
recorded in the MLflow run; and two launcher mistakes end in gptdist's one line within seconds instead of a hang.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import yaml

from tests.accelerate_helpers import accelerate_launch, accelerate_yaml, open_recipe
from tests.helpers import ROOT, assert_ok, cpu_env, launch

STEPS = 10
TRAIN = {"steps": STEPS, "micro_batch_size": 4, "global_batch_size": 8, "log_every": 5}


def _bitwise_equal(a, b) -> None:
    verdict = subprocess.run([sys.executable, "-m", "gptdist.cli", "compare-loss", str(a), str(b), "--rtol", "0"],
                             cwd=ROOT, capture_output=True, text=True)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"MATCH: {STEPS} common steps" in verdict.stdout


def _resolved(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _launcher_tag(run) -> str:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "run_complete.json").read_text())["mlflow_run_id"]
    return MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}").get_run(run_id).data.tags["gptdist.launcher"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pipeline_under_accelerate_matches_the_deepspeed_launcher(tmp_path, corpus, tokenizer_path):
    """pp=2; accelerate's default config file (in HF_HOME) names a DeepSpeed file asking for ZeRO-1 and bf16, the
    rest "auto"."""
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                   "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                   "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    # What `accelerate config` writes when given a DeepSpeed file: no mixed_precision, no zero_stage of its own.
    accelerate_yaml(hf_home / "accelerate" / "default_config.yaml", mixed_precision=None,
                    deepspeed_config={"deepspeed_config_file": str(ds_file), "zero_stage": None,
                                      "gradient_accumulation_steps": None, "offload_optimizer_device": None,
                                      "offload_param_device": None})
    under_accelerate, under_deepspeed = tmp_path / "accelerate", tmp_path / "deepspeed"
    recipe = open_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, under_accelerate, train=TRAIN,
                         parallel={"pp": 2}, tracking={"enabled": True})

    started = time.time()
    proc = accelerate_launch(["--main_process_port", str(_free_port())], recipe, hf_home=hf_home)
    accelerate_s = time.time() - started
    assert_ok(proc)
    resolved = _resolved(under_accelerate)
    assert (resolved["parallel"]["pp"], resolved["parallel"]["zero_stage"]) == (2, 1)
    assert resolved["train"]["precision"] == "bf16"
    assert resolved["train"]["deepspeed_config"] == str(ds_file)
    # Rank 0 alone reports: one progress line and one summary, not one per rank.
    output = proc.stdout + proc.stderr
    assert output.count("gptdist | finished") == 1 and output.count("gptdist | run dir") == 1, output[-3000:]

    started = time.time()
    assert_ok(launch(recipe, [f"run.dir={under_deepspeed}", "parallel.zero_stage=1", "train.precision=bf16"]))
    print(f"\naccelerate launch pp=2: {accelerate_s:.0f} s; deepspeed launcher: {time.time() - started:.0f} s")
    _bitwise_equal(under_deepspeed, under_accelerate)
    assert _launcher_tag(under_accelerate) == "accelerate" and _launcher_tag(under_deepspeed) == "deepspeed"


def test_zero2_under_accelerate_matches_the_deepspeed_launcher(tmp_path, corpus, tokenizer_path):
    """dp=2 ZeRO-2 and gradient clipping 0.5 from an accelerate config file (--config_file); the deepspeed
    launcher's run gets the same file through launch/train.sh --accelerate-config."""
    config = accelerate_yaml(tmp_path / "zero2.yaml", deepspeed_config={"zero_stage": 2, "gradient_clipping": 0.5,
                                                                        "gradient_accumulation_steps": 1})
    hf_home = tmp_path / "hf"  # empty: the file given is the only accelerate config read
    hf_home.mkdir()
    under_accelerate, under_deepspeed = tmp_path / "accelerate", tmp_path / "deepspeed"
    recipe = open_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, under_accelerate, train=TRAIN)

    started = time.time()
    assert_ok(accelerate_launch(["--config_file", str(config), "--main_process_port", str(_free_port())], recipe,
                                hf_home=hf_home))
    accelerate_s = time.time() - started
    started = time.time()
    # GPUS_PER_NODE unset: the file's num_processes says 2.
    proc = subprocess.run(["bash", "launch/train.sh", "--accelerate-config", str(config), str(recipe),
                           f"run.dir={under_deepspeed}"], cwd=ROOT, env=cpu_env({"HF_HOME": str(hf_home)}),
                          capture_output=True, text=True, timeout=900)
    assert_ok(proc)
    print(f"\naccelerate launch dp=2 ZeRO-2: {accelerate_s:.0f} s; launch/train.sh: {time.time() - started:.0f} s")
    assert "valid for 2 rank(s): tp=1 pp=1 dp=2 zero=2" in proc.stdout
    for run in (under_accelerate, under_deepspeed):
        resolved = _resolved(run)
        assert resolved["parallel"]["zero_stage"] == 2
        assert (resolved["train"]["grad_clip"], resolved["train"]["precision"]) == (0.5, "fp32")
    # The gradient norms exceed 0.5, so clipping shaped every step: equal losses mean the same clipping was applied.
    from gptdist.telemetry.metrics_file import read_metrics

    assert all(r["grad_norm"] > 0.5 for r in read_metrics(under_accelerate / "metrics.jsonl") if "loss" in r)
    _bitwise_equal(under_deepspeed, under_accelerate)


def test_cpu_flag_ends_in_one_line_not_a_hang(tmp_path, corpus, tokenizer_path):
    recipe = open_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "run", train=TRAIN)
    started = time.time()
    proc = accelerate_launch(["--cpu", "--num_processes", "2"], recipe, hf_home=tmp_path / "hf", timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    lines = [line for line in output.splitlines() if line.startswith("gptdist: ")]
    assert lines == ["gptdist: accelerate launch --cpu starts one process with no rank, whatever --num_processes "
                     "says (and gptdist runs on the CPU by itself where there is no GPU): drop --cpu and launch "
                     "with --use_deepspeed --num_processes N"], output[-3000:]
    assert not (tmp_path / "run").exists()
    print(f"\naccelerate launch --cpu refused after {time.time() - started:.0f} s")


def test_non_standard_multinode_launcher_ends_in_one_line_per_node(tmp_path, corpus, tokenizer_path):
    """--deepspeed_multinode_launcher nossh: accelerate starts the deepspeed launcher, which appends --local_rank;
    this node's ranks refuse before any process group (the other node is never started: nothing waits for it)."""
    recipe = open_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, tmp_path / "run", train=TRAIN)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    work = tmp_path / "cwd"  # accelerate writes ./.deepspeed_env here, not in the checkout
    work.mkdir()
    started = time.time()
    proc = accelerate_launch(["--use_deepspeed", "--num_machines", "2", "--num_processes", "4", "--machine_rank", "0",
                              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
                              "--deepspeed_multinode_launcher", "nossh", "--deepspeed_hostfile", str(hostfile)],
                             recipe, hf_home=tmp_path / "hf", cwd=work, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    lines = [line for line in output.splitlines() if line.startswith("gptdist: ")]
    assert len(lines) == 1, output[-3000:]
    assert "through the deepspeed launcher" in lines[0] and "(it passed --local_rank=0)" in lines[0], lines[0]
    # The pitfall the message warns about, seen for real: accelerate appended its environment to ./.deepspeed_env.
    assert "ACCELERATE_USE_DEEPSPEED=true" in (work / ".deepspeed_env").read_text()
    assert not (tmp_path / "run").exists()
    print(f"\naccelerate launch --deepspeed_multinode_launcher nossh refused after {time.time() - started:.0f} s")
