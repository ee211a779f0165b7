"""What gptdist knows about the launchers that start its ranks.

`gptdist train` runs the same way whoever starts it (the deepspeed launcher, torchrun, srun, or `accelerate
launch`): it reads its place from RANK/WORLD_SIZE/LOCAL_RANK (gptdist/engine/process.py) and builds the DeepSpeed
engine itself. This package holds the launcher-specific parts around that:

    detect.py               which launcher started this rank (recorded in the MLflow run)
    accelerate_env.py       `accelerate launch`: the mistakes it lets through, the settings it exports (ACCELERATE_*)
    accelerate_config.py    an accelerate config YAML, read with accelerate's own loader: node layout and settings
    accelerate_settings.py  accelerate's settings -> gptdist config keys; contradictions refused in one line
    run_config.py           the run config of `gptdist train`/`check`: the recipe plus what the launcher passed
"""
