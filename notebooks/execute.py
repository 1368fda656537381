"""Execute the walkthrough notebooks in a real Jupyter kernel, and store them with their outputs.

    python notebooks/execute.py                 # both, on the default model, outputs written back
    python notebooks/execute.py --sync-code     # the same, after copying the English code cells into the Chinese
    python notebooks/execute.py --model DIR --out /tmp/nb   # on another model, the stored ones untouched

The English notebook is where code is edited; the Chinese one has the same cells (same ids, same
code) with the prose translated, and tests/test_notebooks.py holds them to that.

The kernel is always this interpreter (a kernel spec written to a temporary directory, so neither
`ipykernel install` nor whatever `python3` kernel the machine has is involved), started in the
repository's root with the repository first on PYTHONPATH, so the npllama it imports is this
checkout's. The notebooks run concurrently, one kernel each.

Stored notebooks keep their outputs, text and PNG figures, and nothing volatile: no execution
timings, no Python version, execution counts from 1 in cell order. tests/test_notebooks.py runs
them the same way and compares what they print with what is stored (`shapes`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NOTEBOOKS = {"en": HERE / "llama3_from_scratch_numpy.ipynb", "zh": HERE / "llama3_from_scratch_numpy.zh.ipynb"}
MODEL_VARIABLE = "NPLLAMA_NOTEBOOK_MODEL"  # the environment variable the notebook's first cell reads
KERNEL_NAME = "npllama-notebook"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}  # what is stored
TIMEOUT = 1800  # seconds per cell: the 8B's all-layers cell upcasts 15 GB of bf16 weights
# A shape as NumPy prints it: (16, 576), (576,), ().
SHAPE = re.compile(r"\((?:\d+, )+\d+\)|\(\d+,\)|\(\)")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def output_text(output) -> str:
    """The text an output shows: a stream's, or an execute result's text/plain."""
    if output.output_type == "stream":
        return output.text
    if output.output_type in ("execute_result", "display_data"):
        return output.get("data", {}).get("text/plain", "")
    return ""


def shapes(nb) -> list[list[str]]:
    """For each code cell, the shapes it printed (as tuples) and the figures it drew (as "figure")."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        items = []
        for output in cell.outputs:
            items += SHAPE.findall(output_text(output))
            if "image/png" in output.get("data", {}):
                items.append("figure")
        found.append(items)
    return found


def errors(nb) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == "error"]


def clean(nb) -> nbformat.NotebookNode:
    """Drop what changes from run to run or machine to machine, so a re-run changes only outputs."""
    nb.metadata = nbformat.NotebookNode(kernelspec=dict(KERNELSPEC), language_info={"name": "python"})
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesced(cell.outputs)
    return nb


def coalesced(outputs: list) -> list:
    """Consecutive prints to the same stream as one output: the kernel sends a stream in pieces cut
    wherever its buffer was flushed, which differs from run to run (and may cut a shape in two)."""
    merged = []
    for output in outputs:
        if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == output.name):
            merged[-1].text += output.text
        else:
            merged.append(output)
    return merged


def sync_code(source, target) -> int:
    """Copy `source`'s code cells into `target`, cell for cell; returns how many changed. The two
    must have the same cells (ids and types): a cell added to one needs its twin in the other."""
    if [(c.id, c.cell_type) for c in source.cells] != [(c.id, c.cell_type) for c in target.cells]:
        ours, theirs = {c.id for c in source.cells}, {c.id for c in target.cells}
        raise ValueError(f"the notebooks' cells differ (only in the first: {sorted(ours - theirs)}, only in "
                         f"the second: {sorted(theirs - ours)}, or in order or type): make them match first")
    changed = 0
    for a, b in zip(source.cells, target.cells):
        if a.cell_type == "code" and a.source != b.source:
            b.source, changed = a.source, changed + 1
    return changed


def kernel_env(model: str | Path | None) -> dict[str, str]:
    """This process's environment, with the model the notebook must run (or none: the default) and
    the repository first on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in (MODEL_VARIABLE, "MPLBACKEND")}
    if model is not None:
        env[MODEL_VARIABLE] = str(model)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def write_kernelspec(directory: Path) -> None:
    """A kernel spec that starts ipykernel in this very interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    write_kernel_spec(directory / KERNEL_NAME)


async def execute_async(nb, model, kernels: Path, timeout: int = TIMEOUT):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False, allow_errors=False,
                            resources={"metadata": {"path": str(REPO)}})
    await client.async_execute(env=kernel_env(model))
    return nb


def execute_all(runs: list[tuple[nbformat.NotebookNode, str | Path | None]], timeout: int = TIMEOUT,
                return_exceptions: bool = False) -> list:
    """Execute each (notebook, model) concurrently, each in its own kernel; the model None is the
    default model. A notebook whose cell fails raises nbclient's CellExecutionError (its cell and
    traceback), after every kernel has stopped; or, with return_exceptions, takes its place."""
    with tempfile.TemporaryDirectory(prefix="npllama-kernels-") as tmp:
        write_kernelspec(Path(tmp))

        async def run_all():
            return await asyncio.gather(*(execute_async(nb, model, Path(tmp), timeout) for nb, model in runs),
                                        return_exceptions=True)
        results = asyncio.run(run_all())
    for result in results:
        if isinstance(result, BaseException) and not return_exceptions:
            raise result
    return [r if isinstance(r, BaseException) else clean(r) for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model path for the notebooks (default: the default model)")
    parser.add_argument("--out", type=Path, help="directory to write the executed notebooks to "
                        "(default: over the stored ones, allowed only on the default model)")
    parser.add_argument("--only", choices=sorted(NOTEBOOKS), help="execute one notebook only")
    parser.add_argument("--sync-code", action="store_true", help="first copy the English notebook's code "
                        "cells into the Chinese one")
    args = parser.parse_args(argv)
    if args.model and not args.out:
        parser.error("--model needs --out: the stored notebooks show the default model")
    names = [args.only] if args.only else list(NOTEBOOKS)
    notebooks = {n: read(NOTEBOOKS[n]) for n in NOTEBOOKS}
    if args.sync_code:
        print(f"{sync_code(notebooks['en'], notebooks['zh'])} code cells copied into the Chinese notebook",
              file=sys.stderr)
    executed = execute_all([(notebooks[n], args.model) for n in names])
    for name, nb in zip(names, executed):
        path = (args.out / NOTEBOOKS[name].name) if args.out else NOTEBOOKS[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
