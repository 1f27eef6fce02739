"""Using a trained run: generation with a KV cache (sample.py), downstream tasks (tasks.py), their scoring (score.py)
and the evaluation of a run or of params during training (suite.py; CLI: __main__.py, `python -m scaling.evaluate`)."""
