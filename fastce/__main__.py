"""``python -m fastce``: the worked examples and a short timing; ``python -m fastce bench``."""
import sys

from .bench import main

if __name__ == "__main__":
    sys.exit(main())
