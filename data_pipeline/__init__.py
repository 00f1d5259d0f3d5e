"""mtrain's data pipeline: shard formats, shard tools and the staged streaming loader.

Usable without mtrain: nothing here imports the trainer or the model. The tokenizer, image
processor and visual-token count come in as arguments.
"""
