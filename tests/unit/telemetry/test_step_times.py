"""The step-time breakdown: every part of the loop lands in its own bucket, batches' waits are taken out of the
model's lap, and the warm-up steps are not counted."""

import json
import time

from gptdist.telemetry.step_times import PARTS, StepTimes, describe


def test_parts_are_timed_apart_after_the_warm_up(tmp_path):
    waited = [0.0]
    times = StepTimes(lambda: waited[0], start_step=0)
    for step in range(1, 16):
        times.begin(step)
        time.sleep(0.002)
        waited[0] += 0.001  # the feed says 1 ms of the model's lap was waiting for batches
        times.lap("model")
        time.sleep(0.001)
        times.lap("telemetry")
        if step == 15:
            time.sleep(0.01)
            times.lap("validation")
    found = times.write(tmp_path)
    assert json.loads((tmp_path / "step_times.json").read_text()) == found
    assert found["steps"] == 5 and found["after_step"] == 10  # steps 11..15
    per = found["ms_per_step"]
    assert set(per) == set(PARTS)
    assert abs(per["data"] - 1.0) < 1e-9  # exactly what the feed reported
    assert 0.8 <= per["model"] < 6 and 0.9 <= per["telemetry"] < 6 and 1.9 <= per["validation"] < 8
    assert per["checkpoint"] == 0 and per["stop"] == 0
    assert 0 < found["around_the_model"] < 1 and 0 < found["scheduled"] < 1
    assert "around the model" in describe(found)


def test_a_resumed_run_counts_from_its_own_start():
    times = StepTimes(lambda: 0.0, start_step=100)
    for step in range(101, 112):
        times.begin(step)
        times.lap("model")
    assert times.summary()["steps"] == 1 and times.summary()["after_step"] == 110
    assert StepTimes(lambda: 0.0, start_step=0).summary() is None
