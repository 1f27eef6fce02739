"""The throughput benchmark (runner.py) and the reference steps it compares against (references.py)."""
