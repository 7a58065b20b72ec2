"""litovis: fine-tune Ovis2.5 with LoRA on mixed-task multimodal data, with PyTorch Lightning."""

__version__ = "0.1.0"
