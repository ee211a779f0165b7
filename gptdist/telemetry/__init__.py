"""What a training run reports: everything rank 0 writes or sends while the run goes on.

    telemetry.py    the Telemetry object the loop talks to (outputs on rank 0, none on the other ranks)
    log.py          rank-0 messages on stderr
    reporter.py     per-step records: losses kept on the device until a logging window closes, the progress bar
    metrics_file.py RUN_DIR/metrics.jsonl
    tracking.py     MLflow: the run, its params, metrics and artifacts; retry.py keeps what an outage held back
    memory.py       the per-rank memory report (live_bytes.py: the CPU's counting allocator, csrc/)
    peak.py         the job's peak FLOP/s, the denominator of MFU
    profiling.py    opt-in comms and pipeline-instruction profiles
    plot.py         the training curves as a PNG
"""
