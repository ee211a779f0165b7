"""What each rank holds in memory, measured: the per-rank memory report in RUN_DIR/memory/rank_<r>.json.

Three measurements, each from a different place, so that they check each other:

* model states, by kind and dtype: every tensor the engine keeps, found by walking the module's parameters and
  gradients, the optimizer's state and DeepSpeed's own optimizer object (ZeRO flat buffers, fp32 master
  partitions, gradient buckets), each storage counted once. Kinds: params, grads, master (fp32 copies the
  optimizer updates), optimizer (Adam moments), buffers (anything else DeepSpeed holds: reduce buckets...).
  Taken at the moment the optimizer of step N (profile.memory_step, default 2) starts, when gradients and Adam
  state exist together, and again after the engine is built and at the end.
* live tensor bytes and their peak: on a GPU, the caching allocator's counters; on a CPU, those of gptdist's
  counting CPU allocator (telemetry/live_bytes.py), installed before the model is built, so every tensor the run
  makes is counted, on every thread, and removed after step N (counting costs each step fresh pages from the
  kernel; a step's peak is reached in its first steps). Until step N the run is also cut into phases
  (construction, each forward, backward, optimizer call) and each phase's peak is kept, so a report says where the
  memory went; on a CPU the overall peak covers the run up to step N, on a GPU the whole run.
* the process as the OS sees it: VmRSS and VmHWM (peak resident set) from /proc/self/status, which includes what
  torch does not allocate (Python, libraries, communication buffers).

Rank 0 prints one line (largest and smallest rank) after step N and logs the same numbers to MLflow.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from gptdist.engine.optim import base_optimizer
from gptdist.telemetry.live_bytes import LiveBytes, build_problem

KINDS = ("params", "grads", "master", "optimizer", "buffers")


# ---------------------------------------------------------------------------------------------- the model states


class _Inventory:
    def __init__(self) -> None:
        self.seen: Dict[Tuple[str, int], str] = {}
        self.bytes: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, tensor: Any, kind: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage of its own (sparse, nested, wrapper tensors)
            return
        size = storage.nbytes()
        key = (str(tensor.device), storage.data_ptr())
        if size == 0 or key in self.seen:
            return
        self.seen[key] = kind
        self.bytes[kind][str(tensor.dtype).replace("torch.", "")] += size

    def walk(self, obj: Any, kind_of: Callable[[str], str], path: str = "", visited: Optional[set] = None) -> None:
        """Every tensor reachable from a DeepSpeed optimizer object, through its attributes and containers."""
        visited = set() if visited is None else visited
        if isinstance(obj, torch.Tensor):
            self.add(obj, kind_of(path))
            self.add(obj.grad if obj.is_leaf else None, "grads")
            return
        if id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                self.walk(value, kind_of, f"{path}.{key}" if not isinstance(key, torch.Tensor) else path, visited)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in obj:
                self.walk(value, kind_of, path, visited)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                self.walk(value, kind_of, f"{path}.{key}", visited)

    def totals(self) -> Dict[str, Dict[str, int]]:
        return {kind: dict(self.bytes[kind]) for kind in KINDS if self.bytes.get(kind)}


def model_state_bytes(engine) -> Dict[str, Dict[str, int]]:
    """{kind: {dtype: bytes}} of every tensor the engine keeps for the model (see the module docstring)."""
    inv = _Inventory()
    params = list(engine.module.parameters())
    for p in params:
        inv.add(p, "params")
        inv.add(getattr(p, "ds_tensor", None), "params")
    for p in params:
        inv.add(p.grad, "grads")
    base = base_optimizer(engine)
    if base is not None:
        # What the optimizer updates: its state's keys (every group that has stepped) and its groups' parameters
        # (DeepSpeed's ZeRO steps one group at a time, so param_groups may list only the current one).
        updated = list(base.state.keys()) + [p for group in base.param_groups for p in group["params"]]
        for p in updated:
            inv.add(p, "master")
            inv.add(p.grad, "grads")
        for state in base.state.values():
            for value in state.values():
                inv.add(value, "optimizer")
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is not None and wrapper is not base:
        inv.walk(wrapper, lambda path: "grads" if "grad" in path.lower() else "buffers")
    return inv.totals()


def total(by_kind: Dict[str, Dict[str, int]]) -> int:
    return sum(sum(d.values()) for d in by_kind.values())


# ------------------------------------------------------------------------------------------- live tensor bytes


class PhaseTracker:
    """Live tensor bytes at marks, and the peak of each phase between two marks (telemetry/live_bytes.py counts)."""

    def __init__(self, live: LiveBytes) -> None:
        self.live = live
        self.phases: List[Dict[str, Any]] = []
        self.overall = 0
        self.recording = True  # phases are kept until the memory step; the overall peak for the whole run
        self._current: Optional[Tuple[str, int]] = None

    def mark(self, label: str) -> Optional[Dict[str, int]]:
        """None once the counter has stopped (a CPU's counting allocator is removed after the memory step)."""
        if self.live.stopped:
            return None
        now, peak = self.live.read()
        self.overall = max(self.overall, peak)
        if self.recording:
            if self._current is not None:
                self.phases.append({"phase": self._current[0], "start_live": self._current[1], "peak_live": peak})
            self._current = (label, now)
            self.live.reset_peak()
        return {"live": now, "peak": self.overall}

    def stop_phases(self) -> None:
        self.mark("end of phases")
        self.recording = False
        self.live.stop()

    def peak(self) -> int:
        return self.overall if self.live.stopped else max(self.overall, self.live.read()[1])


def process_memory() -> Dict[str, int]:
    """VmRSS and VmHWM of this process in bytes, from /proc (empty where there is no /proc)."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_bytes" if key == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------------------- the report


class MemoryReport:
    """One rank's memory report. Call start() before the model is built, watch(engine) once it is, after_step()
    after every optimizer step, and finish() at the end."""

    def __init__(self, enabled: bool, step: int, run_dir: Path, rank, layout: Dict[str, Any]) -> None:
        """rank: the started engine.process.Rank; layout: the layout as a checkpoint records it."""
        topology = rank.topology
        self.enabled, self.step = enabled, step
        self.folder = run_dir / "memory"
        self.rank = rank.world.rank
        self.device_type = rank.device_type
        self.record: Dict[str, Any] = {
            "rank": self.rank, "tp_rank": topology.tp_rank, "pp_rank": topology.pp_rank,
            "dp_rank": topology.dp_rank, "device": self.device_type, "layout": layout, "memory_step": step,
            "snapshots": {},
        }
        self._tracker: Optional[PhaseTracker] = None
        self._engine = None
        self._hooks: list = []
        self._pending: Optional[Dict[str, Dict[str, int]]] = None
        self._steps_done = 0  # optimizer steps this process has finished
        # Host memory the run keeps outside the model states (the checkpoint snapshot): name -> bytes now.
        self.host_buffers: Dict[str, Callable[[], int]] = {}

    def start(self) -> None:
        if not self.enabled:
            return
        live = LiveBytes(self.device_type)
        if live.available:
            self._tracker = PhaseTracker(live)
            self._tracker.mark("@build")
        else:
            self.record["live_bytes_unavailable"] = build_problem() or f"no live-bytes counter on {self.device_type}"

    def watch(self, engine) -> None:
        if not self.enabled:
            return
        self._engine = engine
        self._snapshot("engine_built")
        base = base_optimizer(engine)
        if base is not None:
            def before_update(optimizer, args, kwargs) -> None:
                # DeepSpeed's ZeRO calls the optimizer once per parameter group: the first call of step N is the
                # moment gradients and optimizer state all exist: what "model states" means. Steps are counted
                # by after_step, not by the engine, whose count a resume sets after this hook exists.
                if self._pending is None and self._steps_done == self.step - 1:
                    self._pending = model_state_bytes(engine)
                    marked = self._mark("optimizer_step")
                    if marked is not None:
                        self.record["snapshots"]["optimizer_step"] = {"live_bytes": marked["live"]}

            self._hooks = [base.register_step_pre_hook(before_update)]
        if self._tracker is not None:
            self._hooks += self._phase_marks(engine, base)

    def _phase_marks(self, engine, base) -> list:
        """Marks (named "@...") at every forward, backward and optimizer call until the memory step, so the report
        can say in which phase each peak was."""
        trace = self._tracker

        # Every hook returns None: a value would replace the arguments, outputs or gradients it is given.
        def marker(label):
            def hook(*_):
                trace.mark(label)
            return hook

        def forward_ends(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(marker("@backward"))  # runs with the first gradient of backward

        hooks = [engine.module.register_forward_pre_hook(marker("@forward")),
                 engine.module.register_forward_hook(forward_ends)]
        if base is not None:
            hooks.append(base.register_step_pre_hook(marker("@optimizer")))
            hooks.append(base.register_step_post_hook(marker("@after optimizer")))
        return hooks

    def after_step(self, step: int, global_step: int, log=None, tracker=None) -> None:
        """`step`: optimizer steps done by this process (a resumed run counts from its start), `global_step`: the
        run's step number."""
        self._steps_done = step
        if not self.enabled or step != self.step:
            return
        self.record["global_step"] = global_step
        self._snapshot(f"step_{step}")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._tracker is not None:
            self._tracker.stop_phases()
            self.record["phases"] = self._tracker.phases
            if self._tracker.live.stopped:
                self.record["live_bytes_counted_until_step"] = global_step
        if self._pending is not None:
            snap = self.record["snapshots"].setdefault("optimizer_step", {})
            snap.update(by_kind=self._pending, model_state_bytes=total(self._pending))
        self.record["model_state_bytes"] = total(self._pending or {})
        self.record["model_state_by_kind"] = self._pending or {}
        self._summary(log, tracker, global_step)
        self._write()

    def finish(self) -> None:
        if not self.enabled:
            return
        if self._engine is not None:
            self._snapshot("end")
        self._write()

    # -------------------------------------------------------------------------------------------------- inner

    def _mark(self, label: str) -> Optional[Dict[str, int]]:
        return self._tracker.mark(label) if self._tracker is not None else None

    def _snapshot(self, label: str) -> None:
        snap: Dict[str, Any] = {"by_kind": model_state_bytes(self._engine), **process_memory()}
        snap["model_state_bytes"] = total(snap["by_kind"])
        marked = self._mark(label)
        if marked is not None:
            snap.update(live_bytes=marked["live"], peak_live_bytes=marked["peak"])
        if self.device_type == "cuda":
            snap["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        self.record["snapshots"][label] = snap
        self._update_peaks()

    def _update_peaks(self) -> None:
        for name, nbytes in self.host_buffers.items():
            self.record.setdefault("host_buffers", {})[name] = max(nbytes(), self.record.get("host_buffers", {})
                                                                   .get(name, 0))
        if self._tracker is not None:
            self.record["peak_live_bytes"] = self._tracker.peak()
        self.record["peak_rss_bytes"] = process_memory().get("peak_rss_bytes")

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._update_peaks()
        tmp = self.folder / f".rank_{self.rank}.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.folder / f"rank_{self.rank}.json")

    def _summary(self, log, tracker, step: int) -> None:
        """Collective: the largest and smallest rank of each figure, printed and logged by rank 0."""
        mine = {"model_states": self.record.get("model_state_bytes") or 0,
                "peak_live": self.record.get("peak_live_bytes") or 0,
                "peak_rss": process_memory().get("peak_rss_bytes") or 0}
        everyone: List[Optional[Dict[str, int]]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return
        parts, metrics = [], {"step": step}
        for key, label in (("model_states", "model states"), ("peak_live", "peak live tensors"),
                           ("peak_rss", "peak RSS")):
            values = [(e[key], r) for r, e in enumerate(everyone)]
            (hi, hi_rank), (lo, lo_rank) = max(values), min(values)
            parts.append(f"{label} {_gib(hi)} (rank {hi_rank}) .. {_gib(lo)} (rank {lo_rank})")
            metrics[f"memory/{key}_max_bytes"], metrics[f"memory/{key}_min_bytes"] = hi, lo
        if log is not None:
            log.info(f"gptdist | memory per rank at step {step}: " + "; ".join(parts))
        if tracker is not None:
            tracker.log_metrics([metrics])


def read_rank_records(folder: Path) -> Dict[int, Dict[str, Any]]:
    """The rank_<r>.json records of a folder of per-rank reports (memory/, profile/), by rank."""
    out = {}
    for path in sorted(folder.glob("rank_*.json")):
        record = json.loads(path.read_text())
        out[int(record["rank"])] = record
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def read_reports(run_dir: Path) -> Dict[int, Dict[str, Any]]:
    """Every rank's memory report of a run, by rank."""
    return read_rank_records(run_dir / "memory")


def figures(records: Iterable[Dict[str, Any]], key: str) -> List[int]:
    return [int(r.get(key) or 0) for r in records]
