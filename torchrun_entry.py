"""Worker entry point for torchrun.

    torchrun --nproc-per-node=2 torchrun_entry.py recipes/quickstart.yaml [dotted.key=value ...]
"""

import sys

from localsgd.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
