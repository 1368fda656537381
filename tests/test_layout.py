"""The package's shape, checked from its source: no module imports one that imports it back, and
each weight's name is spelled once, in config's table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from npllama.config import GLOBAL_TENSORS, LAYER_TENSORS

PACKAGE = Path(__file__).resolve().parent.parent / "npllama"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The npllama modules a source file imports, anywhere in it: an import inside a function is
    an import too, it only runs later."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from .formats import gguf` imports the module npllama.formats.gguf; `from .config
            # import ModelArgs` imports npllama.config.
            found |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names}
    return {m for m in found if m == "npllama" or m.startswith("npllama.")} - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "npllama.formats.gguf" in graph["npllama.formats"]  # from .gguf import read_gguf
    assert "npllama.config" in graph["npllama.formats.meta"]  # from ..config import ...
    assert "npllama.formats" in graph["npllama.cli.common"]  # `from .. import formats`, in a function
    assert "npllama.generate" in graph["npllama.model"]  # Llama.generate's


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_forward_pass_needs_no_command_line_and_no_reader():
    """The math, the model and generation stand alone: a student reads them without the rest."""
    graph = import_graph()
    core = ("npllama.layers", "npllama.model", "npllama.generate", "npllama.resident_or_streamed")
    for name in core:
        assert not {m for m in graph[name] if m.startswith(("npllama.cli", "npllama.formats"))}, name


# A layer's math, by the names both passes give it: a function so named (or ending with one, as
# rows_linear did) anywhere else is a third copy of a forward pass.
MATH = ("linear", "rms_norm", "attention", "apply_rope", "rope_cis", "silu", "swiglu", "feed_forward", "softmax",
        "causal_mask", "block", "transformer_block")
FORWARD_PASSES = ("npllama.layers", "npllama.model", "npllama.engine")


def is_math(name: str) -> bool:
    """A function of a layer's math; plots of it and log-probabilities for scoring are not."""
    name = name.lstrip("_")
    return name in MATH or name.endswith(tuple("_" + m for m in MATH)) and not name.startswith(("plot_", "log_"))


def test_the_forward_pass_is_written_twice_never_three_times():
    """The plain traced pass a student reads (layers.py + model.py) and the one runtime engine
    (engine.py): a layer's math defined anywhere else is a third copy, which drifts (issue 19:
    each feature's own copy missed some other feature); and the engine defines each once."""
    defined = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        defined[module_name(path)] = [f for f in functions if is_math(f)]
    elsewhere = {m: fs for m, fs in defined.items() if fs and m not in FORWARD_PASSES}
    assert not elsewhere, f"a layer's math outside the two forward passes: {elsewhere}"
    engine = defined["npllama.engine"]
    assert len(engine) == len(set(engine)) and {"linear", "attention", "swiglu", "rope_cis", "block"} <= set(engine)


NAMES = {name for t in LAYER_TENSORS + GLOBAL_TENSORS for name in (t.meta, t.gguf, t.hf)}


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "config.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_tensor_names_are_spelled_only_in_configs_table(path):
    """A weight's name written as a string anywhere but npllama/config.py is a second table that
    can drift from the first (the oracle, the independent formulation, keeps its own)."""
    spelled = {node.value for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and any(node.value == name or node.value.endswith("." + name) for name in NAMES)}
    assert not spelled, f"{path.name} spells {sorted(spelled)}: derive it from npllama.config"


def test_no_test_module_imports_another():
    """What two test modules share lives in conftest.py (fixtures) or oracle/ (reference code)."""
    for path in sorted(PACKAGE.parent.joinpath("tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        shared = {n for n in names if n.split(".")[0] in ("tests", "conftest") or n.startswith("test_")}
        assert not shared, f"{path.name} imports {sorted(shared)}"
