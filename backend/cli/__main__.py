"""`python -m backend.cli`: the same entry point as the `clipseg` console script."""
import sys

from backend.cli import main

sys.exit(main())
