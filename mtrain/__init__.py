"""mtrain: DeepSpeed training for multimodal LLMs with Matryoshka structure."""

__version__ = "0.1.0"
