"""The Colossus planner: will a model fit, and how long will its training take, on N GPUs? (toolbox/plan.py)

python scripts/plan.py --model PRESET --gpus N --gpu h100|h200|b200|a100|cpu --strategy S [--json] ...
"""

import sys

from toolbox.plan import main

if __name__ == "__main__":
    sys.exit(main())
