"""haqmoe: Hessian-aware W8A8 quantization and CPU-GPU collaborative inference for MoE LLMs."""

__version__ = "0.1.0"
