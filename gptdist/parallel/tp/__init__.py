"""Megatron-style tensor parallelism, applied to the plain GPT from outside.

    comm.py     the autograd-aware collectives (copy/reduce/gather) over the tensor-parallel group
    layers.py   column- and row-parallel linear layers, the vocab-parallel embedding
    head.py     the vocab-parallel LM head and its cross-entropy (logits never gathered)
    plan.py     which module of the GPT becomes which parallel layer, applied on the meta device
    shard.py    cutting a full tensor into a rank's piece and joining the pieces (partition dim and stride)
    grad.py     the global gradient norm with each parameter counted once
    state.py    a parallel model's state as the full tensors of the plain GPT, and back
"""
