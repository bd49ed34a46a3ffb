"""``python -m images``: build the guest image from a shell (see ``images.cli``)."""

import sys

from images.cli import main

sys.exit(main())
