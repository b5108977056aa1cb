"""``python -m pipeline.download``: the download stage's command line."""

import sys

from pipeline.download.stage import main

sys.exit(main())
