"""Checkpoints: DeepSpeed's sharded files plus gptdist's client state, a layout-free copy of the weights and
optimizer moments, a manifest that makes a checkpoint count as complete, and the `latest` pointer."""
