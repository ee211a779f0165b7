"""The DeepSpeed engine of one rank, and the process it runs in.

    process.py     where this process stands in the job (World), the process group, a clean exit
    ds_config.py   the DeepSpeed JSON generated from the run config (a user's file merged over it)
    optim.py       AdamW's parameter groups, the learning-rate schedule, the optimizer below DeepSpeed's wrappers
    build.py       the model with the layout's parallelism applied, wrapped by deepspeed.initialize
    steps.py       one optimizer step on the plain engine (pp = 1) and on the pipeline engine (pp > 1)

Nothing here knows about checkpoints, metrics or the training loop: those sit above it (checkpoint/, telemetry/,
train/) and use it.
"""
