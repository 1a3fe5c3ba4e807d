"""`python -m parity.report`."""

import sys

from parity.report.cli import main

sys.exit(main())
