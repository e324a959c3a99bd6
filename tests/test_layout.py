"""The repository's shape: the paper in six root modules, the rest in folders by role, imports that only
point down, no import circle, small files, no sys.path edits outside tests/ and notebooks/.

Every module's imports are read with `ast`, those inside functions included, so a late `import x`
cannot hide a dependency. A module may import one of its own layer or of a lower one, never a higher
one, and the graph must have no cycle. The table below is the layout README's "Reading the code"
describes; a new module gets a row here.
"""
import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500  # a module; a test file may reach 600
PAPER = ("model", "layers", "loss", "data", "train", "evaluate")  # the method, at the root
SCRIPTS = ("predict", "app")  # beside them, what a person runs to use a model
FOLDERS = ("helpers", "sources", "tools")  # everything else, by role

LAYERS = {
    # 0: building blocks with no knowledge of data, model or tools
    "layers": 0, "loss": 0, "helpers.distributed": 0, "helpers.files": 0, "helpers.cli": 0,
    "helpers.inputs": 0, "helpers.clip_weights": 0, "helpers.weights": 0, "helpers.hardware": 0,
    # 1: the data: model inputs, the LMDB format, each source's converter, the dataset (data.py)
    "helpers.transforms": 1, "sources.lmdb_store": 1, "sources.phrasecut": 1, "sources.coco": 1,
    "sources.refcoco": 1, "sources.grefcoco": 1, "sources.voc": 1, "sources.synthetic": 1, "sources.build": 1, "data": 1,
    # 2: the model
    "model": 2,
    # 3: what the tools share about a model: checkpoints, inference, drawing a prediction
    "helpers.checkpoints": 3, "helpers.safetensors_folder": 3, "helpers.model_files": 3, "helpers.provenance": 3,
    "helpers.engines": 3, "helpers.inference": 3, "helpers.onnx_model": 3, "helpers.batch_predict": 3,
    "helpers.folder_index": 3, "helpers.visualize": 3, "helpers.eval_files": 3,
    # 4: the metrics and the evaluation
    "evaluate": 4,
    # 5: a run's settings and folder, and the figures labelled with scores
    "helpers.train_config": 5, "helpers.runs": 5, "helpers.figures": 5,
    # 6: what a person runs
    "train": 6, "predict": 6, "app": 6, "tools.benchmark": 6, "tools.ablation": 6, "tools.cris": 6,
    "tools.export": 6, "tools.agree": 6, "tools.render_notebooks": 6,
}


def project_modules() -> dict:
    """{dotted name: path} of every module outside tests/ and notebooks/ (a folder's __init__ excluded)."""
    found = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
    for folder in FOLDERS:
        found.update({f"{folder}.{path.stem}": path for path in sorted((ROOT / folder).glob("*.py"))
                      if path.stem != "__init__"})
    return found


def imports_of(path: Path, known) -> set:
    """The project modules `path` imports anywhere in its code (top level, functions, classes):
    `import a.b`, `from a.b import c` and `from a import b` (when a.b is a module) all count."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in known)
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


@pytest.mark.parametrize("path", sorted(project_modules().values()) + sorted(ROOT.glob("tests/*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path):
    lines, most = len(path.read_text().splitlines()), MAX_LINES + 100 * (path.parent.name == "tests")
    assert lines <= most, f"{path.name} has {lines} lines (at most {most}): split it by idea"


def test_the_root_holds_the_paper_and_two_scripts_and_folders_by_role():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(PAPER + SCRIPTS)
    for folder in FOLDERS:
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ has no __init__.py saying what it holds"
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= set(FOLDERS) | {"tests"}, f"folders beyond {FOLDERS}: {sorted(packages - set(FOLDERS))}"


def test_no_module_outside_tests_and_notebooks_edits_sys_path():
    edits = [f"{name}" for name, path in project_modules().items() if re.search(r"sys\.path\.(insert|append)|"
             r"sys\.path\s*=|sys\.path\s*\+=", path.read_text())]
    assert not edits, f"these modules edit sys.path: {edits}"


def test_no_private_name_is_imported_across_modules():
    """A `_name` is its module's own business: another module that needs it gets a public name."""
    known = project_modules()
    private = [f"{name} imports {node.module}.{alias.name}" for name, path in known.items()
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
               and node.module in known for alias in node.names if alias.name.startswith("_")]
    assert not private, private


def test_root_names_do_not_shadow_well_known_packages():
    """A root module or folder named like a package users install (Hugging Face's `datasets`, `utils`, ...)
    would hide it from every script run here."""
    well_known = {"datasets", "transformers", "utils", "metrics", "evaluate_lib", "tokenizers", "clip", "torch",
                  "torchvision", "lmdb", "gradio", "onnx", "safetensors", "tqdm", "numpy", "PIL", "matplotlib",
                  "pycocotools", "cli", "files", "inference", "visualize", "tests"}
    names = {p.stem for p in ROOT.glob("*.py")} | set(FOLDERS)
    assert not names & well_known, sorted(names & well_known)


def test_public_names_import_from_where_readme_and_the_notebooks_say():
    import data
    import evaluate
    import predict
    from helpers import inference
    from helpers.model_files import load_checkpoint
    from loss import RAFLoss
    from model import build_model
    assert data.PhraseCutLMDB.__module__ == "data"
    assert (predict.load_model, predict.open_image, predict.predict, predict.overlay) == \
        (inference.load_model, inference.open_image, inference.predict, inference.overlay)
    assert evaluate.task_iou.__module__ == "evaluate" and evaluate.summarize.__module__ == "evaluate"
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
    assert imports_of(source, {"c.d"}) == {"c.d"}  # from c.d import y
    folder = tmp_path / "n.py"
    folder.write_text("from helpers import files\nimport tools.cris\n")
    assert imports_of(folder, {"helpers.files", "tools.cris", "helpers.cli"}) == {"helpers.files", "tools.cris"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
