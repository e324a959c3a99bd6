"""The repository's shape: modules in layers that only point down, no import circle, small files.

Every module's imports are read with `ast`, those inside functions included, so a late
`import x` cannot hide a dependency. A module may import one of its own layer or of a lower
one, never a higher one, and the graph must have no cycle. The table below is the layout
README's "Layout" paragraph describes; a new module gets a row here.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

LAYERS = {
    # 0: building blocks, no knowledge of data, model or tools
    "layers": 0, "loss": 0, "distributed": 0, "files": 0, "cli": 0, "metrics": 0,
    # 1: the data layer: model inputs, the LMDB format, each source, the datasets, its command line
    "transforms": 1, "lmdb_store": 1, "phrasecut": 1, "coco": 1, "refcoco": 1, "voc": 1, "synthetic": 1,
    "datasets": 1, "data": 1,
    # 2: the model
    "model": 2,
    # 3: what the tools share about a model: checkpoints, inference, pictures, a run's settings and files
    "checkpoints": 3, "inference": 3, "visualize": 3, "train_config": 3, "runs": 3,
    # 4: the tools a user runs
    "train": 4, "evaluate": 4, "predict": 4, "cris": 4, "benchmark": 4, "ablation": 4, "app": 4,
}


def project_modules() -> dict:
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def imports_of(path: Path, known) -> set:
    """The project modules `path` imports anywhere in its code (top level, functions, classes)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def graph() -> dict:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(edges: dict):
    """One import cycle as a list of module names, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    missing = sorted(set(project_modules()) - set(LAYERS))
    assert not missing, f"modules without a row in LAYERS (tests/test_layout.py): {missing}"
    gone = sorted(set(LAYERS) - set(project_modules()))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_imports_only_point_down():
    upward = [f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})"
              for name, deps in graph().items() for dep in sorted(deps)
              if name in LAYERS and dep in LAYERS and LAYERS[dep] > LAYERS[name]]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("tests/*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (at most {MAX_LINES}): split it by idea"


def test_public_names_keep_their_import_paths():
    """Names users import from earlier versions still import from there (README and notebooks use them)."""
    import data
    import datasets
    import evaluate
    import inference
    import predict
    from checkpoints import load_checkpoint
    from loss import RAFLoss
    from model import build_model
    assert data.PhraseCutLMDB is datasets.PhraseCutLMDB
    assert (predict.load_model, predict.open_image, predict.predict) == \
        (inference.load_model, inference.open_image, inference.predict)
    assert callable(evaluate.evaluate) and callable(load_checkpoint) and callable(build_model) and callable(RAFLoss)


# The checker itself, on hand-made graphs and files: it must see what it is there to see.

def test_find_cycle_sees_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom a import x\n\ndef f():\n    import b\n    from c.d import y\n"
                      "class K:\n    def g(self):\n        import e as z\n")
    assert imports_of(source, {"a", "b", "c", "e", "os"}) == {"os", "a", "b", "c", "e"}
    assert imports_of(source, {"b"}) == {"b"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
