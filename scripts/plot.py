"""Plot training runs from their metrics.jsonl: one PNG, several runs overlaid (toolbox/plot.py).

python scripts/plot.py RUN_DIR [RUN_DIR ...] [--out FILE.png]
"""

import sys

from toolbox.plot import main

if __name__ == "__main__":
    sys.exit(main())
