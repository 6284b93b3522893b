"""`python -m fastvpd.convert SRC OUT ...`: the converter's command line (see fastvpd.convert.cli)."""

import sys

from fastvpd.convert.cli import main

sys.exit(main())
