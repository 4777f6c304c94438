"""`python -m fnlm.cli ARGS` is `fnlm ARGS`."""

import sys

from fnlm.cli import main

sys.exit(main())
