"""HF <-> Megatron-Core checkpoint conversion."""
