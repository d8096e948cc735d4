"""The house rules, checked on the source: dependencies run one way through the layers, no import cycles (lazy
imports included), backbones never import the shared package, nothing imports a tool, modules stay readable, and
nothing outside the registry reads a backbone attribute the backbone contract does not declare."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

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


# The backbone contract (diffusion.registry.Backbone): what the package may read of a backbone.
CONTRACT = ("conditioning", "num_labels", "null_label", "label_dropout", "context_shape", "input_shape",
            "hidden_size", "token_grid", "tap_blocks", "BLOCK_CLASS", "ATTENTION_PATHS")
# the names a backbone goes by (bare, or inside DDP / torch.compile)
BACKBONE_RECEIVERS = {"net", "model", "backbone", "raw", "ema", "unwrapped", "inner", "module", "_orig_mod"}


def backbone_private_names() -> set[str]:
    """Every attribute, submodule, parameter and class member of the backbones that the contract does not declare
    (nn.Module's own API aside)."""
    from torch import nn

    from diffusion.registry import BACKBONES, build_model

    names = set()
    for name in BACKBONES:
        with torch.device("meta"):
            net = build_model({"name": name, "depth": 2})
        names |= set(vars(net)) | set(net._modules) | set(net._parameters) | set(net._buffers)
        names |= {k for cls in type(net).__mro__ if cls.__module__.split(".")[0] in BACKBONES for k in vars(cls)}
    return {n for n in names if not n.startswith("_")} - set(CONTRACT) - set(dir(nn.Module()))


def _receiver(node: ast.AST) -> str | None:
    """The name a value goes by (``net``, ``self.model``'s ``model``); None for a config section (``config.model``)."""
    if isinstance(node, ast.Name):
        return node.id
    if not isinstance(node, ast.Attribute):
        return None
    section = isinstance(node.value, ast.Name) and node.value.id in {"config", "cfg"}
    return None if section else node.attr


def _undeclared_reads(tree: ast.AST, private: set[str]) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            name = node.args[1] if len(node.args) >= 2 else None
            if isinstance(name, ast.Constant) and name.value in private:
                found.append((node.lineno, f"{node.func.id}(.., {name.value!r})"))
        elif isinstance(node, ast.Attribute) and node.attr in private and _receiver(node.value) in BACKBONE_RECEIVERS:
            found.append((node.lineno, f".{node.attr}"))
    return found


def test_nothing_outside_the_registry_reads_an_undeclared_backbone_attribute():
    private = backbone_private_names()
    assert {"clip_dim", "x_embedder", "in_blocks", "embed_dim", "grid_size", "extras", "y_embedder"} <= private
    assert _undeclared_reads(ast.parse("getattr(net, 'clip_dim')\nmodel.module.x_embedder\nconfig.model.depth"),
                             private) == [(1, "getattr(.., 'clip_dim')"), (2, ".x_embedder")]
    found = [f"{path.relative_to(REPO)}:{line}: {what}" for module, path in project_modules().items()
             if module != "diffusion.registry" and module.split(".")[0] not in BACKBONES
             for line, what in _undeclared_reads(ast.parse(path.read_text()), private)]
    assert found == []
