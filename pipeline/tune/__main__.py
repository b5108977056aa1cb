"""``python -m pipeline.tune``: the tune stage's command line (pipeline.tune.sweep.main)."""

import sys

from pipeline.tune.sweep import main

sys.exit(main())
