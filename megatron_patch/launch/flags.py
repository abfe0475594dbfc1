"""Render Megatron argument values (``{"num_layers": 32, ...}``) as Megatron-LM command-line flags.

The option strings come from Megatron's own parser, so a value whose flag is spelled differently
from its destination (``add_bias_linear=False`` -> ``--disable-bias-linear``) renders correctly and
a name Megatron does not know is an error instead of a silently dropped setting.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping
from typing import Any


@functools.cache
def _megatron_actions() -> dict[str, argparse.Action]:
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {action.dest: action for action in parser._actions if action.option_strings}


def megatron_flags(values: Mapping[str, Any]) -> list[str]:
    """Flags that set ``values`` on Megatron's parser; values equal to the default are omitted."""
    actions = _megatron_actions()
    flags: list[str] = []
    for dest, value in values.items():
        action = actions.get(dest)
        if action is None:
            raise ValueError(f"{dest!r} is not a Megatron-LM argument")
        if value == action.default:
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if value != action.const:
                raise ValueError(f"{option} can only set {dest}={action.const!r}, not {value!r}")
            flags.append(option)
        elif isinstance(value, list | tuple):
            flags += [option, *map(str, value)]
        else:
            flags += [option, str(value)]
    return flags
