"""Export a training checkpoint to a Hugging Face folder (see --help).

python scripts/export_hf.py CHECKPOINT OUT [--tokenizer DIR] [--dtype fp32|bf16] [--max-shard-size 2GB] [--overwrite]
"""

import sys

from toolbox.export import main

if __name__ == "__main__":
    sys.exit(main())
