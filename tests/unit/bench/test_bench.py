"""Smoke tests of `gptdist bench train` and `gptdist bench parallel`: the table code runs on a tiny model for a step
or two. No timing assertions: the benchmarks themselves are what prove speed (docs/performance.md)."""

from __future__ import annotations

import re

import pytest

from gptdist.bench.comms import comms_table, idle_fraction, pipeline_table, throughput_table, volume_per_step
from gptdist.bench.parallel import Outcome, Run, comms_runs, layouts
from gptdist.bench.table import build_lines, format_table
from gptdist.bench.workers import RowResult
from gptdist.cli import main
from tests.bench_helpers import TINY, table_rows


def test_train_table_from_synthetic_rows():
    results = [
        RowResult("gptdist", [1.0, 1.2], 2, 300 * 2**20, {"params": 1_000_000}),
        RowResult("plain", [1.1, 1.3], 2, 200 * 2**20, {"params": 1_000_000}),
        RowResult("transformers", error="Traceback ...\nRuntimeError: boom"),
        RowResult("ceiling", [0.5], 2, 10 * 2**20, {"flops_per_step": 1e9}),
    ]
    lines = build_lines(results, {"plain": "plain loop"}, tokens_per_step=1000, flops_per_token=1e6,
                        datasheet_peak=None)
    by = {ln.title: ln for ln in lines}
    assert by["gptdist"].step_s == pytest.approx(0.55)
    assert by["plain loop"].ratio == pytest.approx(1.0)
    assert by["gptdist"].ratio == pytest.approx(1.2 / 1.1)
    assert by["gptdist"].mfu == pytest.approx(1000 / 0.55 * 1e6 / 4e9)  # ceiling: 1e9 FLOPs x 2 steps in 0.5 s
    assert "boom" in by["transformers"].note and by["transformers"].tokens_per_s is None
    text = format_table(lines, gpu=True)
    assert "MFU (datasheet)" in text and len(text.splitlines()) == 2 + len(results)


def test_bench_train_command_without_deepspeed_row(capsys):
    code = main(["bench", "train", "configs/tiny-cpu.yaml", *TINY, "--steps", "1", "--warmup", "1", "--repeats", "2",
                 "--skip", "gptdist", "--skip", "in-training", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert set(rows) == {"plain PyTorch loop (nanoGPT)", "plain loop + gptdist chunked loss",
                         "transformers GPT2LMHeadModel", "matmul ceiling"}
    assert rows["plain PyTorch loop (nanoGPT)"][5] == "1.00x"
    assert re.match(r"[\d,]+ GFLOP/s", rows["matmul ceiling"][-1])




# ---------------------------------------------------------------- bench parallel: tables and profiles


def zero_outcome(name, stage, comms):
    return Outcome(Run(name, 2, [f"parallel.zero_stage={stage}"], comms=True), profile={0: {"rank": 0, "comms": comms}})


def test_comms_volume_in_paper_units():
    psi = 1_000_000
    # ZeRO-1 as DeepSpeed does it by default: the gradients all-reduced (2 Ψ), parameters all-gathered (Ψ/2 shards);
    # gptdist's default reduces each slice to its owner: the paper's 2 Ψ
    default = {"all_reduce": {"1000000": 2, "4": 4}, "all_gather_into_tensor": {"500000": 2}}
    vol = volume_per_step(default, steps=2, dp=2)
    assert vol["all_reduce"]["calls"] == 3 and vol["all_reduce"]["big_calls"] == 1
    assert vol["all_gather_into_tensor"]["paper"] == psi
    assert sum(v["paper"] for v in vol.values()) == pytest.approx(3 * psi + 16)  # + two 4-byte flags per step
    reduce = {"reduce": {"500000": 4}, "all_gather_into_tensor": {"500000": 2}}
    text = comms_table([zero_outcome("dp2 zero1 allreduce", 1, default), zero_outcome("dp2 zero1", 1, reduce),
                        Outcome(Run("dp2 zero3", 2, ["parallel.zero_stage=3"], comms=True), error="exit 1")],
                       psi, dp=2, steps=2)
    rows = table_rows(text)
    assert rows["dp2 zero1 allreduce"][2] == "3.00 Ψ" and rows["dp2 zero1 allreduce"][3] == "2 Ψ"
    assert rows["dp2 zero1"][2] == "2.00 Ψ"
    assert "failed" in rows["dp2 zero3"][1]


def test_pipeline_idle_fraction_and_tables():
    step = {"train_batch": 1.0, "OptimizerStep": 0.1, "ReduceGrads": 0.1, "ForwardPass": 0.2, "BackwardPass": 0.4}
    assert idle_fraction([step] * 4) == pytest.approx(1 - 0.6 / 0.8)
    assert idle_fraction([]) is None
    pp = Outcome(Run("pp2", 2, ["parallel.pp=2"]), tokens_per_s=100.0,
                 profile={0: {"stage": 0, "pipe_steps": [step] * 4}, 1: {"stage": 1, "pipe_steps": [step] * 4}})
    one = Outcome(Run("1 rank", 1, []), tokens_per_s=50.0, threads=2)
    rows = table_rows(pipeline_table([pp], [pp], micro=4, global_batch=16))
    assert rows["pp2"][3] == "20%" and "stage 0: 25%" in rows["pp2"][4]
    merged = Outcome(pp.run)
    for rate in (90.0, 110.0, 100.0):
        merged.merge(Outcome(pp.run, tokens_per_s=rate, profile=pp.profile))
    merged.merge(Outcome(pp.run, error="exit 1"))
    assert merged.tokens_per_s == 100.0 and merged.profile == pp.profile and "one repeat" in merged.error
    rows = table_rows(throughput_table([one, pp, merged]))
    assert rows["pp2"][4] == "2.00x" and rows["pp2"][5] == "20%"


def test_layouts_cover_the_brief():
    names = {r.name for r in layouts()}
    assert {"1 rank", "dp2 zero1", "dp2 zero2", "dp2 zero3", "tp2", "pp2", "tp2 pp2 dp2"} <= names
    assert all(r.global_batch == 8 and r.comms for r in comms_runs())  # one micro-batch of 4 per rank per step




def test_peer_windows_are_ten_steps_after_step_ten():
    from gptdist.bench.peers import Cell, format_peers, window_rates

    ends = [float(i) for i in range(1, 41)]  # one step a second
    assert window_rates(ends, 100) == [100.0, 100.0, 100.0]  # steps 11-20, 21-30, 31-40
    ends[25:] = [e + 5 for e in ends[25:]]  # a 5 s pause in step 26
    assert window_rates(ends, 100) == [100.0, 1000 / 15, 100.0]
    cells = {(s, w, z): Cell() for s in ("gptdist", "hf-trainer", "ds-loop") for w, z in ((1, 1), (2, 2))}
    cells[("gptdist", 1, 1)].rates = [1200.0]
    cells[("hf-trainer", 1, 1)].rates = [1000.0]
    cells[("ds-loop", 1, 1)].error = "boom"
    text = format_peers(cells, [(1, 1)])
    assert "| 1 | 1 | 1,200 | 1,000 | failed | 1.20x |  |" in text and "| 2 | 2 |" not in text
