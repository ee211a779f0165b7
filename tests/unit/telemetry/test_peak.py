"""The MFU denominator: measured the way the job runs, cached per machine, and never an MFU above 100 %."""

from __future__ import annotations

import json

import torch

from gptdist.telemetry import peak
from gptdist.telemetry.reporter import StepReporter


def test_cpu_peak_keeps_the_best_measurement_per_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rates = []
    monkeypatch.setattr(peak, "measure_rank_flops", lambda: rates.pop(0))
    rates[:] = [3e9]
    assert peak.job_peak_flops(None, "cpu", "fp32", world_size=1, local_world_size=1, is_main=True) == 3e9
    cache = tmp_path / "gptdist" / "cpu_peak.json"
    [key] = json.loads(cache.read_text())
    assert f"threads={torch.get_num_threads()}" in key and "local_ranks=1" in key
    # Measured under load: the run still gets the machine's best, and the cache is not lowered.
    rates[:] = [1e8]
    assert peak.job_peak_flops(None, "cpu", "fp32", world_size=1, local_world_size=1, is_main=True) == 3e9
    assert json.loads(cache.read_text())[key] == 3e9
    # A quieter run than any before raises it.
    rates[:] = [4e9]
    assert peak.job_peak_flops(None, "cpu", "fp32", world_size=1, local_world_size=1, is_main=True) == 4e9
    assert json.loads(cache.read_text())[key] == 4e9
    # Another share of the cores is another measurement.
    rates[:] = [2e9]
    assert peak.job_peak_flops(None, "cpu", "fp32", world_size=1, local_world_size=2, is_main=True) == 2e9
    assert len(json.loads(cache.read_text())) == 2
    # A declared peak is per device: the job's is that times the ranks.
    assert peak.job_peak_flops(5e9, "cpu", "fp32", world_size=4, local_world_size=4, is_main=True) == 2e10


def test_a_peak_measured_under_load_first_is_raised_by_what_a_run_achieves(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "measure_rank_flops", lambda: 1e8)  # the only measurement ever taken: under load
    job_peak = peak.job_peak_flops(None, "cpu", "fp32", world_size=2, local_world_size=2, is_main=True)
    assert job_peak == 2e8
    raised = []
    reporter = StepReporter(tokens_per_step=1000, samples_per_step=4, flops_per_token=1e6, job_peak_flops=job_peak,
                            dp_group=None, dp_size=1, metrics=_Metrics(), tracker=_Tracker(), progress=_Progress(),
                            warn=lambda m: None, peak_exceeded=lambda achieved: raised.append(achieved) or
                            peak.raise_cpu_peak(achieved, 2, 2))
    reporter.add(1, torch.tensor(2.0), 1e-3, None)
    reporter.flush()  # 1000 tokens in a few microseconds: far above 2e8 FLOP/s
    assert len(raised) == 1 and raised[0] > job_peak
    # The next run, measured under load again, shows an MFU: the achieved rate is its peak now.
    later = peak.job_peak_flops(None, "cpu", "fp32", world_size=2, local_world_size=2, is_main=True)
    assert later == raised[0]
    assert peak.mfu(raised[0] / 1e6 / 2, 1e6, later) == 0.5


def test_best_round_is_the_ceiling():
    rate = peak.measure_rank_flops(seconds=0.05, n=256)
    assert 1e8 < rate < 1e13


def test_mfu_above_one_is_not_reported():
    assert peak.mfu(1000.0, 1e6, 2e9) == 0.5
    assert peak.mfu(1000.0, 1e6, 5e8) is None  # 200 %: the peak was wrong, not the model
    assert peak.mfu(1000.0, 1e6, None) is None


class _Progress:
    def __init__(self):
        self.postfix = {}

    def update(self, n):
        pass

    def set_postfix(self, refresh=False, **kw):
        self.postfix = kw

    def close(self):
        pass


class _Metrics:
    def __init__(self):
        self.records = []

    def write(self, records):
        self.records.extend(records)


class _Tracker:
    def log_metrics(self, records):
        pass


def test_reporter_writes_no_mfu_it_cannot_stand_behind():
    warnings, metrics, progress = [], _Metrics(), _Progress()
    reporter = StepReporter(tokens_per_step=1000, samples_per_step=4, flops_per_token=1e6, job_peak_flops=1.0,
                            dp_group=None, dp_size=1, metrics=metrics, tracker=_Tracker(), progress=progress,
                            warn=warnings.append)
    for step in (1, 2):
        reporter.add(step, torch.tensor(2.0), 1e-3, None)
        reporter.flush()
    assert [r["mfu"] for r in metrics.records] == [None, None]
    assert "mfu" not in progress.postfix and len(warnings) == 1 and "MFU above 100 %" in warnings[0]
