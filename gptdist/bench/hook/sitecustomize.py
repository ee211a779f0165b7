"""Measurement hook for `gptdist bench parallel`, loaded only by the ranks that benchmark starts.

`gptdist bench parallel` puts this folder first on PYTHONPATH and sets GPTDIST_BENCH_HOOK_OUT=DIR; Python imports a
module named `sitecustomize` at start-up, so every process of the run (the launcher too) reads this file. Without
the variable it does nothing. With it, the `gptdist train` entry point is wrapped so that, in each rank:

* after the DeepSpeed engine is built, DeepSpeed's comms logger is reset: its totals then cover the training steps
  only, not the start-up broadcasts (the logger itself is enabled by the run's DeepSpeed JSON, train.deepspeed_config);
* under a pipeline, each instruction of the schedule (forward, backward, send/recv, reduce, optimizer) is timed per
  train_batch call, from which the bench computes the idle (bubble) fraction;
* before the rank exits, DIR/rank<R>.json receives the comms logger's raw dictionary and the pipeline timings.

Nothing in gptdist/train knows about this; the bench leaves training code untouched and reads the numbers here.
"""

from __future__ import annotations

import os

_OUT = os.environ.get("GPTDIST_BENCH_HOOK_OUT")


def _install() -> None:
    import gptdist.train.cli as train_cli

    original_run_train = train_cli._run_train

    def run_train(args):
        _patch_rank()
        return original_run_train(args)

    train_cli._run_train = run_train


def _patch_rank() -> None:
    """Runs in a rank process, before training starts."""
    import json
    import time

    import gptdist.train.engine as engine_mod
    import gptdist.train.runtime as runtime_mod

    pipe_steps = []  # one {instruction: seconds, "train_batch": seconds} per train_batch call
    info = {"stage": None}

    def timed(name, fn, current):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    original_build = engine_mod.build_training_engine

    def build_training_engine(*args, **kwargs):
        engine, step_fn, names = original_build(*args, **kwargs)
        import deepspeed.comm as ds_comm

        ds_comm.comms_logger.reset_data()  # start-up collectives are not per-step traffic
        from deepspeed.runtime.pipe.engine import PipelineEngine

        if isinstance(engine, PipelineEngine):
            info["stage"] = engine.stage_id
            current: dict = {}
            table = type(engine)._INSTRUCTION_MAP
            for kind, fn in list(table.items()):
                table[kind] = timed(kind.__name__, fn, current)
            train_batch = type(engine).train_batch

            def timed_train_batch(self, *a, **kw):
                current.clear()
                start = time.perf_counter()
                out = train_batch(self, *a, **kw)
                pipe_steps.append({**current, "train_batch": time.perf_counter() - start})
                return out

            type(engine).train_batch = timed_train_batch
        return engine, step_fn, names

    engine_mod.build_training_engine = build_training_engine

    original_finish = runtime_mod.finish_process

    def finish_process(exit_code):
        try:
            import deepspeed.comm as ds_comm
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
            comms = {name: {str(size): vals[0] for size, vals in sizes.items()}  # name -> msg bytes -> count
                     for name, sizes in ds_comm.comms_logger.comms_dict.items()}
            record = {"rank": rank, "stage": info["stage"], "comms": comms, "pipe_steps": pipe_steps}
            with open(os.path.join(_OUT, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
                json.dump(record, fh)
        except Exception as exc:  # noqa: BLE001 - a failed measurement must not fail the run
            print(f"gptdist bench hook: could not write measurements: {exc}", flush=True)
        _unlink_shm_buffer()
        original_finish(exit_code)

    runtime_mod.finish_process = finish_process


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU shm all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates a 66 MB file per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, whenever the launcher's LOCAL_SIZE
    equals the world size, and never unlinks it: /dev/shm is RAM, so every launched run leaks ranks x 66 MB. The
    peers mapped it at start-up, so at exit the name can go."""
    env = os.environ
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")
    try:
        os.unlink(name)
    except OSError:
        pass


if _OUT:
    try:
        _install()
    except Exception as exc:  # noqa: BLE001 - never break the interpreter over a benchmark hook
        print(f"gptdist bench hook: not installed: {exc}", flush=True)
