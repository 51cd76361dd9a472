"""`python -m benchmarks [options]`: the same runner as `gptfast bench` (options: --help)."""

import sys

from gptfast.bench import main

sys.exit(main())
