"""python -m twinserve ... : the same as the `twinserve` command."""
import sys

from twinserve.cli import main

sys.exit(main())
