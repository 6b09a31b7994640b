"""The model as training holds it: load the (quantized) base and tokenizer, attach LoRA, enable checkpointing,
install the memory operations (peft's split: loading apart from the adapter)."""
