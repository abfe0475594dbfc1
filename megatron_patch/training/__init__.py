"""The training engine: initialisation, the train/eval loop, checkpointing and logging."""
