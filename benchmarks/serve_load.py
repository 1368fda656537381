"""`python benchmarks/serve_load.py [...]`: serve.py's load run (`serve.py --soak [...]`), by its older name."""

import sys

from serve import main

main(["--soak", *sys.argv[1:]])
