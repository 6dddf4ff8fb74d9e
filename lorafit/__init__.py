"""lorafit: LoRA fine-tuning of Hugging Face transformers, driven by YAML recipes."""

__version__ = "0.1.0"
