"""DeepSpeed's getting-started loop: `deepspeed.initialize` around transformers' GPT-2, forward, backward, step.

    deepspeed --num_gpus N gptdist/bench/peer_runs/ds_loop.py --zero 1 ... --out steps.json

The optimizer is DeepSpeed's AdamW with `torch_adam` (torch's AdamW: DeepSpeed's fused CPU Adam would be compiled at
run time) and its WarmupCosineLR schedule, both from the config as the getting-started guide writes them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import StepClock, gpt2, parse_args, random_tokens


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    # deepspeed, torch: loaded after the arguments parse, so a bad command line fails fast
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(args.seed)
    model = gpt2(args)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.clip,
        "zero_optimization": {"stage": args.zero},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [args.beta1, args.beta2], "eps": args.eps,
                                                  "weight_decay": args.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps,
                                                           "warmup_num_steps": args.warmup_steps,
                                                           "cos_min_ratio": args.min_lr / args.lr}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = random_tokens(args, rank, args.micro_batch * args.steps)
    clock = StepClock()
    for step in range(args.steps):
        batch = data[step * args.micro_batch:(step + 1) * args.micro_batch].to(engine.device)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        loss.item()  # what a loop that prints its loss pays; gptdist syncs once per logging window
        clock.tick()
    clock.write(args.out, rank, args.micro_batch * args.seq * world)
    torch.distributed.barrier()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown; everything is written


if __name__ == "__main__":
    main()
