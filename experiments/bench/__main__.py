"""``python -m bench`` (with ``experiments/`` on the path) or ``python experiments/bench``."""

import sys
from pathlib import Path

# Run as a directory, sys.path[0] is experiments/bench itself, where bench/profile.py would shadow
# the standard library's profile (which cProfile imports): put experiments/ there instead.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.run import main  # noqa: E402

raise SystemExit(main())
