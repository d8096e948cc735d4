"""The house rules, checked on the source: dependencies run one way through the layers, no import cycles (lazy
imports included), backbones never import the shared package, nothing imports a tool, modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# Layers from the bottom up; a module may import its own layer and the ones below (docs/architecture.md, "Layers").
LAYERS = [
    ("utilities", ("diffusion.errors", "diffusion.files", "diffusion.seeds")),
    ("mathematics", ("diffusion.objectives", "diffusion.samplers")),
    ("configs and the registry", ("diffusion.config", "diffusion.registry", "diffusion.checkpoint",
                                  "diffusion.weights", "diffusion.released")),
    ("frozen pretrained networks", ("diffusion.pretrained",)),
    ("data", ("diffusion.data",)),
    ("sampling and evaluation", ("diffusion.sampling", "diffusion.evaluation")),
    ("training", ("diffusion.training",)),
    ("tools", ("diffusion.tools",)),
    ("public API", ("diffusion",)),  # diffusion/__init__.py: names re-exported for users' scripts
]
BACKBONES = ("uvit", "dit")
ENTRY_POINTS = ("train", "sample", "eval_fid", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    paths = [*REPO.glob("diffusion/**/*.py"), *REPO.glob("uvit/*.py"), *REPO.glob("dit/*.py"),
             *REPO.glob("scripts/*.py"), *(REPO / f"{name}.py" for name in ENTRY_POINTS[:3])]
    return {module_name(p): p for p in paths}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at top level, inside functions or under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:  # a submodule, else the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def layer_of(module: str) -> int | None:
    ranks = [(len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    return max(ranks)[1] if ranks else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_package_module_has_a_layer(graph):
    assert [m for m in graph if m.startswith("diffusion") and layer_of(m) is None] == []


def test_dependencies_run_one_way(graph):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in graph.items() if m.startswith("diffusion")
              for d in deps if layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert upward == []


def test_backbones_do_not_import_the_shared_package_and_nothing_imports_a_tool(graph):
    backbone_deps = [f"{m} -> {d}" for m, deps in graph.items() if m.split(".")[0] in BACKBONES
                     for d in deps if d.startswith("diffusion")]
    assert backbone_deps == []
    tool_users = [f"{m} -> {d}" for m, deps in graph.items() if m.split(".")[0] == "diffusion"
                  and not m.startswith("diffusion.tools") for d in deps if d.startswith("diffusion.tools")]
    assert tool_users == []


def test_no_import_cycles(graph):
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_modules_stay_readable():
    modules = project_modules()
    top_level = sorted(p.name for p in (REPO / "diffusion").glob("*.py"))
    assert len(top_level) <= 12, top_level
    long = {name: n for name, path in modules.items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}
    undocumented = [name for name, path in modules.items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert undocumented == []


def test_public_api_builds_and_samples_a_model_from_a_config():
    import diffusion

    assert sorted(n for n in diffusion.__all__ if not hasattr(diffusion, n)) == []
    config = diffusion.load_config(REPO / "configs/digits_uvit.py")
    for key, value in (("model.embed_dim", "32"), ("model.depth", "2"), ("model.num_heads", "2")):
        diffusion.apply_override(config, key, value)
    import torch

    torch.manual_seed(0)
    model = diffusion.build_model(config.model).eval()
    objective = diffusion.build_objective(config.diffusion)
    config.sample.steps = 3
    labels = torch.tensor([1, 7])
    images = diffusion.generate(model, objective, config.sample, (1, 8, 8), labels=labels, seed=0)
    again = diffusion.generate(model, objective, config.sample, (1, 8, 8), labels=labels, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all() and torch.equal(images, again)
    assert issubclass(diffusion.errors.ConfigError, diffusion.UserError)
