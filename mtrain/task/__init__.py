"""Task modules: the model plus its losses, returning (loss, metrics). DeepSpeed wraps one of them."""
