"""The GPT decoder (decoder.py) and the CPU kernels it can run with: blocked causal attention, chunked head loss."""
