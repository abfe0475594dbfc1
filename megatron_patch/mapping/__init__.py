"""The vocabulary a model family is written in, below every other megatron-patch package.

``config``: the HF ``config.json`` and Megatron argument dicts a family maps between, and the
refusal of a field it cannot reproduce. ``rules``: the open :class:`~.rules.Rule` protocol and
the declarative HF <-> Megatron-Core weight-mapping rules (``Direct``, ``FusedQKV``,
``GatedMLP``, ...). Families (``megatron_patch.models``) are written in it, and the conversion
engine (``megatron_patch.conversion``) applies it; it imports neither.
"""
