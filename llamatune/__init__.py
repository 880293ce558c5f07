"""llamatune: LoRA/QLoRA fine-tuning of Llama-family models from the command line."""

__version__ = "0.2.0"
