"""DeepSpeed initialisation and the Trainer."""
