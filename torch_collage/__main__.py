"""``python -m torch_collage``: see ``torch_collage.cli``."""

import sys

from torch_collage.cli import main

sys.exit(main())
