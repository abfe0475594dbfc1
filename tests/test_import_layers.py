"""Imports run one way: every module of ``megatron_patch`` and ``rlhf`` imports only from its own
layer or the layers below it (:data:`LAYERS`, the one place the order is written).

Every import statement counts, at module level and inside functions and classes, and so does
``importlib.import_module("literal")``: a lazy import is still a dependency. Modules of the
same layer may import each other. A new package or top-level module must be given a layer here.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("megatron_patch", "rlhf")

# Bottom to top. An entry is a module and, for a package, everything under it; the root
# ``megatron_patch`` entry is the package's own ``__init__`` only.
LAYERS: tuple[tuple[str, str], ...] = (
    ("megatron_patch.assets", "shipped demo data; the demo eval tasks' dataset loader"),
    ("megatron_patch.utils", "files, checkpoint metadata, TP sharding, torchrun relaunches"),
    ("megatron_patch.mapping", "a family's vocabulary: HF/Megatron config types, weight rules"),
    ("megatron_patch.runtime", "backends, the CPU compatibility layer, GPU fast paths, float8"),
    ("megatron_patch.tokenizer", "tokenizers"),
    ("megatron_patch.models", "the family registry, shared layers, one folder per family"),
    ("megatron_patch", "the package's public face: __version__ and the family API"),
    ("megatron_patch.data", "preprocessing, indexed datasets, SFT and multimodal samples"),
    ("megatron_patch.parallel_layout", "a parallel layout's rules for a model, worded by caller"),
    ("megatron_patch.config_checks", "flag combinations that cannot run"),
    ("megatron_patch.arguments", "Megatron-LM's parser plus our flags"),
    ("megatron_patch.training", "initialisation, the loop, checkpoints, the entry points"),
    ("megatron_patch.conversion", "the HF <-> Megatron checkpoint engine, PEFT interchange"),
    ("megatron_patch.conversion.verify", "HF vs Megatron logits, layers, training; cards"),
    ("megatron_patch.conversion.cli", "the `convert`, `verify` and `card` commands"),
    ("megatron_patch.generation", "generation and perplexity on Megatron checkpoints"),
    ("megatron_patch.evaluation", "lm-evaluation-harness on Megatron checkpoints, `eval`"),
    ("megatron_patch.lora", "the PEFT adapter commands import-lora / export-lora"),
    ("megatron_patch.launch", "the Pai-style launcher, model sizes, memory model, plan"),
    ("megatron_patch.cli", "the megatron-patch console script"),
    ("rlhf", "post-training on top of megatron_patch"),
)
ROOT = "megatron_patch"


@dataclass(frozen=True)
class Import:
    """One import of one of our modules: where it is and what it names."""

    importer: str
    path: Path
    line: int
    function: str | None
    imported: str


def module_name(path: Path, root: Path) -> str:
    """Dotted name of the module in ``path`` (a package's ``__init__``: the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    return {module_name(path, root): path
            for package in packages for path in sorted((root / package).rglob("*.py"))}


def _targets(node: ast.AST, importer: str, is_package: bool, modules: dict[str, Path]
             ) -> list[str]:
    """Modules an import statement (or ``import_module("...")`` call) brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the importer's package, up level - 1 packages
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # ``from package import submodule`` imports the submodule; a name is the module's own
        return [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def find_imports(modules: dict[str, Path], packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import of one of ``packages`` in ``modules``, with its line and enclosing function."""
    found = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, function: str | None, importer=importer, path=path) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function = node.name if function is None else f"{function}.{node.name}"
            targets = _targets(node, importer, path.name == "__init__.py", modules)
            for target in dict.fromkeys(targets):  # once per module a statement imports
                if target.split(".")[0] in packages:
                    found.append(Import(importer, path, node.lineno, function, target))
            for child in ast.iter_child_nodes(node):
                visit(child, function)

        visit(tree, None)
    return found


def layer_of(module: str, layers: tuple[tuple[str, str], ...] = LAYERS) -> int | None:
    """Index in ``layers`` of the most specific entry holding ``module``; None if none does."""
    best = None
    for index, (entry, _) in enumerate(layers):
        inside = module == entry or (entry != ROOT and module.startswith(entry + "."))
        if inside and (best is None or len(entry) > len(layers[best][0])):
            best = index
    return best


def upward_imports(imports: list[Import], root: Path,
                   layers: tuple[tuple[str, str], ...] = LAYERS) -> list[str]:
    """One line per import that runs upward (or names a module no layer holds)."""
    problems = []
    for imp in imports:
        here, there = layer_of(imp.importer, layers), layer_of(imp.imported, layers)
        where = f"{imp.path.relative_to(root)}:{imp.line}" + (
            f" (in {imp.function})" if imp.function else "")
        if there is None:
            problems.append(f"{where}: {imp.importer} imports {imp.imported}, which is in no "
                            "layer of tests/test_import_layers.py")
        elif here is not None and there > here:
            problems.append(f"{where}: {imp.importer} [{layers[here][0]}] imports "
                            f"{imp.imported} [{layers[there][0]}], a higher layer")
    return problems


def test_every_module_has_a_layer():
    unplaced = [f"{path.relative_to(REPO)} ({name})" for name, path in find_modules(REPO).items()
                if layer_of(name) is None]
    assert not unplaced, ("modules in no layer; add them to LAYERS in "
                          "tests/test_import_layers.py:\n  " + "\n  ".join(unplaced))


def test_imports_run_downward():
    modules = find_modules(REPO)
    problems = upward_imports(find_imports(modules), REPO)
    assert not problems, ("imports that run upward (layers, bottom to top: "
                          f"{' < '.join(entry for entry, _ in LAYERS)}):\n  "
                          + "\n  ".join(problems))


def test_a_planted_upward_import_is_named(tmp_path):
    """The check itself: upward imports at module level, in a function, through
    ``import_module`` and from a package into its own higher subpackage (conversion's engine
    into its verifiers) are each reported with their file, line and imported module."""
    layers = (("pkg.low", ""), ("pkg", ""), ("pkg.high", ""))
    files = {
        "pkg/__init__.py": "",
        "pkg/high/__init__.py": "from pkg.low import a\n",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "import os\nfrom pkg.high import b\n",
        "pkg/low/c.py": textwrap.dedent("""\
            import importlib


            def lazy():
                from pkg import high
                return importlib.import_module("pkg.high.b")
            """),
        "pkg/high/b.py": "from pkg.low import c\nfrom . import b\n",
        "pkg/mid.py": "from .high import b\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = find_modules(tmp_path, ("pkg",))
    assert upward_imports(find_imports(modules, ("pkg",)), tmp_path, layers) == [
        "pkg/low/a.py:2: pkg.low.a [pkg.low] imports pkg.high.b [pkg.high], a higher layer",
        "pkg/low/c.py:5 (in lazy): pkg.low.c [pkg.low] imports pkg.high [pkg.high], "
        "a higher layer",
        "pkg/low/c.py:6 (in lazy): pkg.low.c [pkg.low] imports pkg.high.b [pkg.high], "
        "a higher layer",
        "pkg/mid.py:1: pkg.mid [pkg] imports pkg.high.b [pkg.high], a higher layer",
    ]
