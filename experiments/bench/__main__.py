"""``python -m bench`` (with ``experiments/`` on the path) or ``python experiments/bench``."""

import sys
from pathlib import Path

if not __package__:  # run as a directory: put experiments/ on the path to import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import main  # noqa: E402

raise SystemExit(main())
