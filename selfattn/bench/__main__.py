"""``python -m selfattn.bench``: the benchmark's command line."""

import sys

from selfattn.bench import main

sys.exit(main())
