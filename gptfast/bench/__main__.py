"""`python -m gptfast.bench`: the same as `gptfast bench`."""

import sys

from . import main

sys.exit(main())
