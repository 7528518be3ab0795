"""The numpy inference engine: GGUF loading, tokenizer, chat template, llama forward pass."""
