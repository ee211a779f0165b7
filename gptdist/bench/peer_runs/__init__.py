"""What users would otherwise run, as `gptdist bench peers` launches it under the deepspeed launcher: transformers'
Trainer with a DeepSpeed ZeRO config (hf_trainer.py) and DeepSpeed's getting-started loop around
`deepspeed.initialize` (ds_loop.py). Both train transformers' GPT2LMHeadModel of the recipe's shape on random tokens
and write rank 0's step end times to --out (common.py)."""
