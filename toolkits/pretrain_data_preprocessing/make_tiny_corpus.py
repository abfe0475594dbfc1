"""Regenerate ``megatron_patch/assets/tiny_corpus.jsonl`` from CPython's standard library.

The documents are the docstrings of the pure-Python standard-library modules of the running
interpreter (PSF License), read with ``ast`` (nothing is imported): per module, the module
docstring followed by each documented class/function as ``def name(signature)`` + docstring,
cut into documents of at most ``--max-chars`` characters at definition boundaries. Files are
visited in sorted order, so the same CPython version gives a byte-identical corpus.

    python toolkits/pretrain_data_preprocessing/make_tiny_corpus.py [--output FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "megatron_patch" / "assets"
# Packages and files left out: tests, tools and demos, generated data, vendored wheels.
SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "__pycache__", "pydoc_data", "encodings", "__phello__", "__hello__.py"}
SKIP_PREFIXES = ("_sysconfigdata", "config-", "test_")


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``.py`` files worth reading, in a stable order."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts) or rel.parts[0].startswith(SKIP_PREFIXES):
            continue
        if rel.name.startswith(SKIP_PREFIXES):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_name(root: Path, path: Path) -> str:
    """Dotted module name of a standard-library file."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[str]:
    """``def``/``class`` headers with their docstrings, recursing into classes."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and (not node.name.startswith("_") or node.name == "__init__"):
                yield f"def {prefix}{node.name}({ast.unparse(node.args)}):\n{doc}"
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            if doc:
                yield f"class {prefix}{node.name}({bases}):\n{doc}"
            yield from _definitions(node.body, f"{prefix}{node.name}.")


def module_sections(root: Path, path: Path) -> list[str]:
    """The module's docstring and its documented public definitions, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(root, path)
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(f"Module {name}\n\n{doc}")
    sections += [f"{name}: {text}" for text in _definitions(tree.body, "")]
    return sections


def pack(sections: list[str], max_chars: int) -> Iterator[str]:
    """Join consecutive sections into documents of at most ``max_chars`` (a longer one alone)."""
    document: list[str] = []
    size = 0
    for section in sections:
        if document and size + len(section) > max_chars:
            yield "\n\n".join(document)
            document, size = [], 0
        document.append(section)
        size += len(section) + 2
    if document:
        yield "\n\n".join(document)


def corpus(root: Path, max_chars: int) -> Iterator[str]:
    """All documents of the corpus, in order."""
    for path in stdlib_files(root):
        yield from pack(module_sections(root, path), max_chars)


def main(argv: list[str] | None = None) -> int:
    """Write the corpus JSONL and print its size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="standard-library directory (default: this interpreter's)")
    parser.add_argument("--output", type=Path, default=ASSETS / "tiny_corpus.jsonl")
    parser.add_argument("--max-chars", type=int, default=4000,
                        help="target maximum characters per document")
    args = parser.parse_args(argv)
    count = chars = 0
    with open(args.output, "w", encoding="utf-8", newline="\n") as out:
        for text in corpus(args.stdlib, args.max_chars):
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
            chars += len(text)
    print(f"{args.output}: {count} documents, {chars} characters from the standard library of "
          f"Python {sys.version.split()[0]} ({args.stdlib})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
