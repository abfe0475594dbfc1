"""Render Megatron argument values (``{"num_layers": 32, ...}``) as Megatron-LM command-line flags.

The option strings come from Megatron's own parser (with megatron-patch's flags added), so a value
whose flag is spelled differently from its destination (``add_bias_linear=False`` ->
``--disable-bias-linear``) renders correctly and an unknown name is an error instead of a
silently dropped setting.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping
from typing import Any


@functools.cache
def _megatron_actions() -> dict[str, argparse.Action]:
    """Megatron-LM's arguments plus ours (``--alibi``, ``--mlp-activation``, ...)."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_patch.arguments import add_patch_arguments

    parser = add_patch_arguments(add_megatron_arguments(argparse.ArgumentParser(
        allow_abbrev=False)))
    return {action.dest: action for action in parser._actions if action.option_strings}


def megatron_defaults() -> dict[str, Any]:
    """Megatron-LM's default value of every argument."""
    return {dest: action.default for dest, action in _megatron_actions().items()}


def megatron_flags(values: Mapping[str, Any]) -> list[str]:
    """Flags that set ``values`` on Megatron's parser; values equal to the default are omitted."""
    actions = _megatron_actions()
    flags: list[str] = []
    for dest, value in values.items():
        action = actions.get(dest)
        if action is None:
            raise ValueError(f"{dest!r} is not a Megatron-LM or megatron-patch argument")
        if value == action.default:
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if value != action.const:
                raise ValueError(f"{option} can only set {dest}={action.const!r}, not {value!r}")
            flags.append(option)
        elif isinstance(value, list | tuple) and (action.nargs in ("+", "*")
                                                  or isinstance(action.nargs, int)):
            flags += [option, *map(str, value)]
        elif isinstance(value, list | tuple):
            flags += [option, _sequence_text(action, value)]
        else:
            flags += [option, _scalar_text(action, value)]
    return flags


def _scalar_text(action: argparse.Action, value: Any) -> str:
    """``str(value)``, checked to parse back to ``value`` with the option's own type."""
    text = str(value)
    try:
        parsed = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError):
        parsed = None
    if parsed != value and not (action.type is None and isinstance(value, str)):
        raise ValueError(f"{action.option_strings[0]} cannot express {value!r} on the command "
                         f"line (Megatron reads it as {getattr(action.type, '__name__', 'text')})")
    return text


def _sequence_text(action: argparse.Action, value: list | tuple) -> str:
    """One-token text for a sequence that Megatron parses itself (``--window-size 4095,0``).

    The text is checked by parsing it back with the option's own type, so a value Megatron
    would read differently is an error here rather than a silently different model.
    """
    for text in (",".join(map(str, value)), str(list(value)).replace(" ", "")):
        try:
            parsed = action.type(text) if action.type else text
        except (AssertionError, TypeError, ValueError, SyntaxError, NameError):
            continue
        if isinstance(parsed, list | tuple) and list(parsed) == list(value):
            return text
    raise ValueError(f"{action.option_strings[0]} cannot express {value!r} on the command line")
