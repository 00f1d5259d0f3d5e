"""Model construction: presets, local checkpoints, freezing and adapters."""
