"""Benchmarks that print numbers, never timed tests: model, data, strategies (toolbox/bench.py).

python scripts/bench.py model|data|strategies [--json] ...   (--help for each)
"""

import sys

from toolbox.bench import main

if __name__ == "__main__":
    sys.exit(main())
