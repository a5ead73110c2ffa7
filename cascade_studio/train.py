"""Entry point for ``accelerate launch -m cascade_studio.train <recipe> [overrides] [--resume]``."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
