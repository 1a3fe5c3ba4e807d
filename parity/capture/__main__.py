"""`python -m parity.capture`: capture one implementation's traces into files."""

import sys

from parity.capture.runner import main

sys.exit(main())
