"""Fine-tuning on your own data: JSONL datasets (``data``), LoRA (``lora``), the ``zuoyou finetune`` command (``run``)."""
