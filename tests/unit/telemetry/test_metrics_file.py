"""metrics.jsonl after a failed write: the next record starts a line of its own, and a resume drops torn lines
anywhere in the file (each named in a warning) instead of refusing; each step is kept once."""

import json

import pytest

from gptdist.errors import UserError
from gptdist.telemetry.metrics_file import MetricsLog, read_metrics, truncate_metrics


class _FillsOnce:
    """A file whose second write is cut short by a full disk: part of the line lands, then ENOSPC."""

    def __init__(self, fh):
        self.fh, self.writes = fh, 0

    def write(self, text):
        self.writes += 1
        if self.writes == 2:
            self.fh.write(text[:7])
            self.fh.flush()
            raise OSError(28, "No space left on device")
        return self.fh.write(text)

    def flush(self):
        self.fh.flush()

    def close(self):
        self.fh.close()


def test_the_write_after_a_failed_one_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    warnings = []
    log = MetricsLog(path, warnings.append)
    log._file = _FillsOnce(log._file)
    for step in (1, 2, 3):
        log.write([{"step": step, "loss": 1.0}])
    log.close()
    assert len(warnings) == 1 and "No space left" in warnings[0]
    assert [r["step"] for r in read_metrics(path)] == [1, 3]
    assert path.read_text().splitlines()[1] == '{"step"'  # the fragment alone on its line


def test_a_resume_drops_torn_lines_anywhere_with_a_warning_naming_each(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 1}), '{"step": 2, "lo', json.dumps({"step": 2}), json.dumps({"step": 3}),
             '{"step": 4, "loss": 5.1, "l']
    path.write_text("\n".join(lines))
    warnings = []
    truncate_metrics(path, 3, warnings.append)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert len(warnings) == 2 and "torn line (line 2:" in warnings[0] and "torn last line (line 5:" in warnings[1]
    truncate_metrics(path, 2, warnings.append)  # a resume from an earlier step: each step still once
    assert [r["step"] for r in read_metrics(path)] == [1, 2] and len(warnings) == 2


def test_a_line_that_is_json_but_not_a_record_is_still_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_metrics(path)
