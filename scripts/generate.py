"""Sample text from a checkpoint or an exported model, streaming tokens to the terminal (see --help).

python scripts/generate.py MODEL [--prompt TEXT ...] [--prompt-file FILE] [--max-new-tokens 200] ...
"""

import sys

from toolbox.generation import main

if __name__ == "__main__":
    sys.exit(main())
