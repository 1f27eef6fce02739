"""Text -> tokens: sources (local files, Hugging Face, the embedded corpus), tokenizers, the token cache, the synthetic
Markov source, and TokenData's step -> batch sampler (tokens.py). `python -m scaling.data` builds a cache."""
