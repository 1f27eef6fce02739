"""Using a trained run: generation with a KV cache and few-shot prompts (sample.py)."""
