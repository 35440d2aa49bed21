"""cpm_live: CPM-Bee fine-tuning with QLoRA on BMTrain and PyTorch FSDP2."""

__version__ = "0.1.0"
