"""`python -m scaling.evaluate RUN_DIR [--tasks ...] [--shots k] [--limit n] [--seed s]`: see scaling/eval/__main__.py."""

import sys

from scaling.eval.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
