"""Evaluate a checkpoint or an exported model: loss, perplexity and bits per byte (see --help).

python scripts/evaluate.py MODEL (--data DIR [--split val|train] | --text FILE) [--seq-len 128] ...
"""

import sys

from toolbox.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
