"""`python benchmarks/fixed_split.py [...]`: storage.py's fixed row blocks (`storage.py --fixed-split [...]`),
by its older name."""

import sys

from storage import main

main(["--fixed-split", *sys.argv[1:]])
