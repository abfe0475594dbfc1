"""Regenerate ``megatron_patch/assets/tiny_chat.jsonl``: a small templated chat/SFT set.

Each line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``.
Conversations come from fixed templates and a seeded RNG: arithmetic (some multi-turn), string
puzzles, and "what does ``module.function`` do?" answered with the first sentence of its
docstring in the running CPython's standard library (PSF License). Same CPython, same file.

    python toolkits/pretrain_data_preprocessing/make_tiny_chat.py [--output FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from make_tiny_corpus import ASSETS, module_name, stdlib_files

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are a Python tutor.")
WORDS = ("python", "megatron", "tensor", "pipeline", "gradient", "token", "dataset", "kernel",
         "matrix", "vector", "layer", "module", "string", "integer", "function", "library",
         "compiler", "network", "sequence", "attention", "optimizer", "parameter", "checkpoint")
Message = dict[str, str]


def _chat(rng: random.Random, turns: list[tuple[str, str]]) -> list[Message]:
    """Messages of a conversation, with a system prompt one time in three."""
    messages = []
    if rng.random() < 1 / 3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in turns:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    return messages


def arithmetic(rng: random.Random, _: list) -> list[Message]:
    """One sum, difference or product; half the time a follow-up on the result."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    ask = rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "Please calculate {} {} {}."])
    turns = [(ask.format(a, op, b), f"{a} {op} {b} = {result}.")]
    if rng.random() < 0.5:
        k = rng.randint(2, 9)
        turns.append((f"Now multiply that by {k}.", f"{result} * {k} = {result * k}."))
    return _chat(rng, turns)


def strings(rng: random.Random, _: list) -> list[Message]:
    """A word puzzle: reverse, upper-case or count the letters of a word."""
    word = rng.choice(WORDS)
    return _chat(rng, [rng.choice([
        (f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."),
        (f"Write '{word}' in capital letters.", word.upper()),
        (f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."),
    ])])


def python_doc(rng: random.Random, functions: list[tuple[str, str, str]]) -> list[Message]:
    """What a standard-library function does; sometimes which module it lives in."""
    module, name, summary = rng.choice(functions)
    ask = rng.choice(["What does the Python function `{}` do?", "Explain `{}` in one sentence.",
                      "What is `{}` for?"])
    turns = [(ask.format(f"{module}.{name}"), summary)]
    if rng.random() < 0.3:
        turns.append(("Which module is it in?", f"It is in the `{module}` module."))
    return _chat(rng, turns)


def documented_functions(root: Path) -> list[tuple[str, str, str]]:
    """(module, function, first docstring sentence) of public module-level functions."""
    found = []
    for path in stdlib_files(root):
        module = module_name(root, path)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            summary = " ".join(doc.split("\n\n")[0].split())
            if 20 <= len(summary) <= 200 and summary.endswith("."):
                found.append((module, node.name, summary))
    return found


def main(argv: list[str] | None = None) -> int:
    """Write the chat JSONL and print its size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="standard-library directory (default: this interpreter's)")
    parser.add_argument("--output", type=Path, default=ASSETS / "tiny_chat.jsonl")
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    functions = documented_functions(args.stdlib)
    makers: list[Callable[[random.Random, list], list[Message]]] = [arithmetic, strings,
                                                                    python_doc, python_doc]
    with open(args.output, "w", encoding="utf-8", newline="\n") as out:
        for _ in range(args.samples):
            messages = rng.choice(makers)(rng, functions)
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"{args.output}: {args.samples} conversations ({len(functions)} documented functions "
          f"of Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
