"""The walkthrough notebooks (notebooks/): executed in a real Jupyter kernel, in English and in
Chinese, on the default model and on a random Llama-3-shaped Meta checkpoint with the real
tokenizer. Every cell asserts its hand-computed array against the model's trace, so a run without
error is the check; the stored outputs must be what a run prints now."""

from __future__ import annotations

import re

import nbformat
import pytest

from notebooks.execute import NOTEBOOKS, code_cells, errors, execute_all, read, shapes
from oracle.checkpoints import tiny_args

# Sizes unlike the default model's and the 8B's (head_dim 8, 3 query heads per key head, 3 layers),
# so that a size written into the notebook instead of read from the configuration would show.
ARGS = tiny_args(dim=96, n_heads=12, n_kv_heads=4, n_layers=3, ffn_dim_multiplier=1.5, multiple_of=64)
ORIGINAL_TOKENS = [128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220]
MAX_BYTES = 1_500_000
CELL_TIMEOUT = 300  # seconds; a cell takes under 2 s on these models

# naklecha's headings, in its order. Two are reworded: its "# lets f... go" and its "### the model
# predicted token number 2983 ...", whose number is the 8B's.
ORIGINAL_HEADINGS = [
    "# llama3 implemented from scratch",
    "## tokenizer",
    "## reading the model file",
    "## we use this config to infer details about the model like",
    "## converting text to tokens",
    "## converting tokens to their embedding",
    "## we then normalize the embedding using rms normalization",
    "# building the first first layer of the transformer",
    "### normalization",
    "### attention implemented from scratch",
    "### unwrapping query",
    "### im going to implement the first head of the first layer",
    "### we now multiply the query weights with the token embedding, to recive a query for the token",
    "## positioning encoding",
    "### RoPE",
    "## using dot product of complex numbers to rotate a vector",
    "### now that we have a complex number (the angle change vector) for every token's query element",
    "### after rotated vector is obtained",
    "# keys (almost the same as queries)",
    "## at this stage now have both the rotated values of queries and keys, for each token.",
    "## in the next step we will multiply the queries and key matrices",
    "# we now have to mask query key scores",
    "## values (almost the end of attention)",
    "## value vectors",
    "## attention",
    "# multi head attention",
    "# weight matrix, one of the final steps",
    "### this is a simple linear layer, so we just matmul",
    "## we normalize and then run a feed forward neural network through the embedding delta",
    "## loading the ff weights and implementing the feed forward network",
    "# WE FINALLY HAVE NEW EDITED EMBEDDINGS FOR EACH TOKEN AFTER THE FIRST LAYER",
    "# god, everything all at once",
    "# have fun reading :)",
    "# we now have the final embedding, the best guess the model could make about the next token",
    "# finally, lets decode the embedding into the token value",
    "# we use the embedding of the last token to predict the next value",
    "### the model predicted a token number as the next token, is this the token number for 42?",
    "#### IM HYPING YOU UP, this is the last cell of code, hopefully you had fun :)",
    "# lets go",
    "# thank you :)",
]

pytestmark = pytest.mark.slow  # Jupyter kernels


def headings(nb) -> list[tuple[int, str]]:
    """(cell index, heading line) of every markdown heading."""
    return [(i, line.strip()) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if re.match(r"#+ ", line)]


@pytest.fixture(scope="module")
def stored():
    return {name: read(path) for name, path in NOTEBOOKS.items()}


@pytest.fixture(scope="module")
def executed(stored, random_checkpoint):
    """Each notebook re-executed: both on the default model (when it can be had), the English one on
    the random Meta checkpoint too, all at once in three kernels. Values: a notebook, an exception
    (the failing cell and its traceback), or a reason to skip."""
    from npllama.formats.default_model import DownloadError, ensure_default_model
    meta = random_checkpoint(ARGS, seed=3)
    runs = {"meta": (read(NOTEBOOKS["en"]), meta)}
    try:
        ensure_default_model(verbose=False)
        runs.update({name: (read(path), None) for name, path in NOTEBOOKS.items()})
        skipped = {}
    except DownloadError as e:
        skipped = {name: f"SmolLM2-135M-Instruct is not installed, cached or downloadable here: {e}"
                   for name in NOTEBOOKS}
    results = execute_all(list(runs.values()), timeout=CELL_TIMEOUT, return_exceptions=True)
    return {**dict(zip(runs, results)), **skipped}


def run_of(executed, name):
    result = executed[name]
    if isinstance(result, str):
        pytest.skip(result)
    if isinstance(result, BaseException):
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(result))  # the kernel's traceback, without its colours
        pytest.fail(f"the {name} run of the notebook failed:\n{plain}", pytrace=False)
    return result


def test_english_and_chinese_have_the_same_code(stored):
    en, zh = stored["en"], stored["zh"]
    assert code_cells(zh) == code_cells(en)
    # Cell for cell, so that each translated paragraph stays beside the code it explains.
    assert [(c.cell_type, c.id) for c in zh.cells] == [(c.cell_type, c.id) for c in en.cells]
    assert [(i, line.split()[0]) for i, line in headings(zh)] == [(i, line.split()[0]) for i, line in headings(en)]


def test_every_section_of_the_original_is_there_in_its_order(stored):
    """Each heading of the original begins a heading of the notebook, in the original's order (the
    notebook adds sections of its own between them, e.g. "the same rotation with cos and sin")."""
    found = iter(line for _, line in headings(stored["en"]))
    missing = [h for h in ORIGINAL_HEADINGS if not any(line.startswith(h) for line in found)]
    assert not missing, f"not found in the original's order: {missing}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_stored_notebook_is_executed_small_and_clean(stored, name):
    nb, path = stored[name], NOTEBOOKS[name]
    nbformat.validate(nb)
    assert path.stat().st_size < MAX_BYTES
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        "not stored by one top-to-bottom run: python notebooks/execute.py"
    assert not errors(nb)
    assert all("execution" not in c.metadata for c in cells)
    assert set(nb.metadata) == {"kernelspec", "language_info"}
    assert sum(items.count("figure") for items in shapes(nb)) == 5  # freqs_cis, RoPE'd pairs, 3 heatmaps
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert text.count("✓ matches trace[") >= 20


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_on_the_default_model_as_stored(executed, stored, name):
    """Every cell ran and asserted against the trace; what it printed is what is stored."""
    nb = run_of(executed, name)
    assert not errors(nb)
    now, then = shapes(nb), shapes(stored[name])
    assert now == then, "the stored outputs are out of date: python notebooks/execute.py refreshes them"


def test_notebook_runs_on_a_llama3_shaped_meta_checkpoint(executed, stored):
    """The Meta branch: Llama 3's tokenizer gives the original's 17 ids, every shape is this model's."""
    nb = run_of(executed, "meta")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(ORIGINAL_TOKENS) in text
    assert "Llama 3's tokenizer: the original's 17 token ids" in text
    assert f"each of the {ARGS.n_layers} layers matches" in text
    now = shapes(nb)
    assert [len(items) for items in now] == [len(items) for items in shapes(stored["en"])]
    printed = {s for items in now for s in items}
    T, hd = len(ORIGINAL_TOKENS), ARGS.head_dim
    assert {f"({T}, {ARGS.dim})", f"({T}, {hd})", f"({T}, {hd // 2}, 2)", f"({T}, {T})",
            f"({ARGS.n_heads}, {hd}, {ARGS.dim})", f"({ARGS.n_kv_heads}, {hd}, {ARGS.dim})",
            f"({ARGS.hidden_dim}, {ARGS.dim})", f"({ARGS.vocab_size},)"} <= printed
