"""`python -m segplat.data.fake NAME OUT` (see segplat/data/fake/__init__.py)."""

import sys

from segplat.data.fake import main

sys.exit(main())
