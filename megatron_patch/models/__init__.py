"""Model families on Megatron-Core."""
