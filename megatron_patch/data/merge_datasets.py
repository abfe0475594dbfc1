"""``megatron-patch merge-datasets``: concatenate ``.bin``/``.idx`` shards into one dataset.

Like Megatron-LM's ``tools/merge_datasets.py``: a directory's datasets are merged in sorted prefix
order; explicit prefixes are merged in the order given. The output appears atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_patch.data.indexed_io import atomic_builder, dataset_files


def dataset_prefixes(inputs: Sequence[str | Path]) -> list[Path]:
    """Dataset prefixes of ``inputs``: each a directory (its datasets, sorted) or a prefix."""
    prefixes: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted({p.with_suffix("") for p in item.iterdir() if p.is_file()
                            and p.suffix in (".bin", ".idx") and not p.name.startswith(".")})
            if not found:
                raise FileNotFoundError(f"--input {item}: no .bin/.idx datasets in it")
            prefixes += found
        else:
            prefixes.append(item)
    for prefix in prefixes:
        for file in dataset_files(prefix):
            if not file.is_file():
                raise FileNotFoundError(f"dataset {prefix}: {file} is missing (a dataset is a "
                                        f"{prefix}.bin + {prefix}.idx pair)")
    return prefixes


def merge_datasets(inputs: Sequence[str | Path], output_prefix: str | Path) -> Path:
    """Merge the datasets of ``inputs`` into ``{output_prefix}.bin/.idx``; returns the prefix."""
    prefixes = dataset_prefixes(inputs)
    output = Path(output_prefix)
    if output.resolve() in {prefix.resolve() for prefix in prefixes}:
        raise ValueError(f"--output-prefix {output} is also an input")
    dtypes = {prefix: IndexedDataset(str(prefix)).index.dtype for prefix in prefixes}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{prefix} ({dtype.__name__})" for prefix, dtype in dtypes.items())
        raise ValueError(f"cannot merge datasets of different token dtypes: {listing}")
    with atomic_builder(output, dtypes[prefixes[0]]) as builder:
        for prefix in prefixes:
            builder.add_index(str(prefix))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch merge-datasets``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="megatron-patch merge-datasets",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--input", nargs="+", required=True,
                        help="a directory of shards, or shard prefixes (without .bin/.idx)")
    parser.add_argument("--output-prefix", required=True,
                        help="merged dataset path without suffix")
    args = parser.parse_args(argv)
    try:
        prefixes = dataset_prefixes(args.input)
        output = merge_datasets(prefixes, args.output_prefix)
    except (ValueError, OSError) as error:
        print(f"merge-datasets: error: {error}", file=sys.stderr)
        return 1
    print(f"merge-datasets: {len(prefixes)} dataset(s) -> {output}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
