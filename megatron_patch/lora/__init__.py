"""LoRA fine-tuning on Megatron-Core, interchangeable with Hugging Face PEFT adapters."""
