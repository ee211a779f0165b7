"""transformers' Trainer with a DeepSpeed ZeRO config, around transformers' GPT-2: what a Hugging Face user runs.

    deepspeed --num_gpus N gptdist/bench/peer_runs/hf_trainer.py --zero 1 ... --out steps.json

What it needs to see CPU ranks under the deepspeed launcher, with transformers 5.25 and DeepSpeed 0.19.8: nothing
beyond DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, which gptdist bench peers sets; DeepSpeed also falls back to
it when it finds no GPU) and gloo, which DeepSpeed picks for it. It was checked to train through a DeepSpeedEngine
at the asked ZeRO stage with and without `use_cpu=True`; the script sets `use_cpu` where there is no GPU, as
transformers documents for CPU training, and fails rather than time another engine (below). The optimizer and
schedule are the Trainer's own (torch AdamW, cosine), which it hands to DeepSpeed; the DeepSpeed config leaves every
size to the Trainer ("auto").
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import StepClock, gpt2, parse_args, random_tokens


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    # torch, transformers: loaded after the arguments parse, so a bad command line fails fast
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.data = random_tokens(args, 0, args.micro_batch * world * args.steps)

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return {"input_ids": self.data[i], "labels": self.data[i]}

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                 "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9}
    with tempfile.TemporaryDirectory(prefix="gptdist-peer-hf-") as out:
        training_args = TrainingArguments(
            output_dir=out, use_cpu=not torch.cuda.is_available(), deepspeed=ds_config,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1, max_steps=args.steps,
            learning_rate=args.lr, weight_decay=args.weight_decay, adam_beta1=args.beta1, adam_beta2=args.beta2,
            adam_epsilon=args.eps, max_grad_norm=args.clip, lr_scheduler_type="cosine",
            warmup_steps=args.warmup_steps, logging_steps=10, save_strategy="no", report_to=[], seed=args.seed,
            dataloader_num_workers=0, disable_tqdm=True)
        torch.manual_seed(args.seed)
        trainer = Trainer(model=gpt2(args), args=training_args, train_dataset=Tokens(), callbacks=[Clock()])
        trainer.train()
        # The row is labelled "with DeepSpeed ZeRO": prove the Trainer really trained through a DeepSpeed engine at
        # the stage asked for, rather than falling back to its own CPU path.
        engine = trainer.model_wrapped
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
        if type(engine).__name__ != "DeepSpeedEngine" or stage != args.zero:
            raise SystemExit(f"the Trainer trained through {type(engine).__name__} (ZeRO {stage}), not DeepSpeed "
                             f"ZeRO {args.zero}")
    clock.write(args.out, rank, args.micro_batch * args.seq * world)
    torch.distributed.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
