"""Benchmarks that print one table measured in one run on this machine (not tests: tests prove the code runs).

    gptdist bench train CONFIG [overrides]     1-rank gptdist (DeepSpeed ZeRO-0) vs a plain PyTorch loop of the same
                                               GPT, transformers' GPT-2 and the measured matmul ceiling
    gptdist bench parallel [CONFIG]            tokens/s per parallel layout under the deepspeed launcher, ZeRO's
                                               communication volume per step, the pipeline bubble

Pieces: runners.py (one training step per row), workers.py (each row in its own process, repeats interleaved),
train.py and table.py (the train table), parallel.py and comms.py (the launcher runs and the comms logger).
docs/performance.md has the latest tables and what they showed.
"""
