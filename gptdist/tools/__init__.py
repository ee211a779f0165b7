"""Commands that work on a finished (or running) training run's checkpoints, one process, no DeepSpeed:

    gptdist export CHECKPOINT_OR_RUN --hf OUT_DIR     a transformers GPT2LMHeadModel directory
    gptdist import-hf HF_DIR --out CHECKPOINT_OR_RUN  a GPT-2 directory as a checkpoint training can resume from
    gptdist generate CHECKPOINT_OR_RUN --prompt TEXT  KV-cache decoding
    gptdist eval CHECKPOINT_OR_RUN --data SOURCE      mean loss and perplexity on held-out text

All of them read the layout-free `model/` copy of a checkpoint, so they work whatever tp/pp/dp layout wrote it.
"""
