"""Fault-tolerance report: break real training runs on purpose and check what survives (toolbox/fault_report.py).

python scripts/faults.py [--work DIR] [--json]
"""

import sys

from toolbox.fault_report import main

if __name__ == "__main__":
    sys.exit(main())
