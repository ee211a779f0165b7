"""Turn the rows' timed windows into the `bench train` table (a Markdown table, so it pastes into the docs).

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token = 6N + 12·L·d·T (gptdist.model.flops_per_token:
Kaplan et al. 2020 for 6N, PaLM appendix B for the attention term). The peak is the matmul ceiling measured in the
same run (and on GPU also the datasheet's dense peak), so on CPU MFU says how close a step gets to what this machine's
matmul can do, not to a number from a brochure.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import List, Optional, Sequence

from gptdist.bench.workers import RowResult


@dataclass
class Line:
    title: str
    tokens_per_s: Optional[float] = None
    step_s: Optional[float] = None
    mfu: Optional[float] = None
    mfu_datasheet: Optional[float] = None
    peak_mib: Optional[float] = None
    ratio: Optional[float] = None
    note: str = ""


def ceiling_flops(results: Sequence[RowResult]) -> Optional[float]:
    for res in results:
        if res.row == "ceiling" and res.seconds and res.info.get("flops_per_step"):
            return res.info["flops_per_step"] * res.steps / statistics.median(res.seconds)
    return None


def build_lines(results: Sequence[RowResult], titles: dict, *, tokens_per_step: int, flops_per_token: float,
                datasheet_peak: Optional[float], baseline: str = "plain") -> List[Line]:
    ceiling = ceiling_flops(results)
    lines: List[Line] = []
    rates = {}
    for res in results:
        line = Line(titles.get(res.row, res.row))
        if res.error is not None:
            line.note = "failed: " + res.error.strip().splitlines()[-1][:100]
        elif res.row == "ceiling":
            line.mfu, line.peak_mib = (1.0 if ceiling else None), res.peak_bytes / 2**20
            line.note = f"{ceiling / 1e9:,.0f} GFLOP/s" if ceiling else ""
        elif res.seconds:
            line.step_s = statistics.median(res.seconds) / res.steps
            line.tokens_per_s = tokens_per_step / line.step_s
            flops = line.tokens_per_s * flops_per_token
            line.mfu = flops / ceiling if ceiling else None
            line.mfu_datasheet = flops / datasheet_peak if datasheet_peak else None
            line.peak_mib = res.peak_bytes / 2**20
            spread = (max(res.seconds) - min(res.seconds)) / statistics.median(res.seconds)
            about = res.info.get("note") or f"{res.info.get('params', 0) / 1e6:.2f} M params"
            line.note = f"{about}, spread {spread:.0%}"
            rates[res.row] = line.tokens_per_s
        lines.append(line)
    base = rates.get(baseline)
    for line in lines:
        if base and line.tokens_per_s:
            line.ratio = line.tokens_per_s / base
    return lines


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(lines: Sequence[Line], gpu: bool) -> str:
    head = ["row", "tokens/s", "step ms", "MFU (measured ceiling)"]
    if gpu:
        head.append("MFU (datasheet)")
    head += ["peak memory MiB" + (" (allocated)" if gpu else " (RSS)"), "vs plain", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for ln in lines:
        cells = [ln.title, _fmt(ln.tokens_per_s, ",.0f"), _fmt(ln.step_s and ln.step_s * 1e3, ",.0f"),
                 _fmt(ln.mfu, ".1%")]
        if gpu:
            cells.append(_fmt(ln.mfu_datasheet, ".1%"))
        cells += [_fmt(ln.peak_mib, ",.0f"), _fmt(ln.ratio, ".2f") + ("x" if ln.ratio else ""), ln.note]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
