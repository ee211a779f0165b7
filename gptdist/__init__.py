"""gptdist: pre-train GPT language models with DeepSpeed tensor, pipeline and ZeRO data parallelism."""

__version__ = "0.1.0"
