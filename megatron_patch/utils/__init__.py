"""Helpers that know nothing of models or Megatron's arguments, at the bottom of the layers.

``files`` (all-at-once output files and directories, the files a model carries besides its
weights), ``metadata`` (the ``megatron_patch.json`` beside a converted checkpoint), ``sharding``
(tensor-parallel shards of unsharded tensors) and ``torchrun`` (free ports, torchrun relaunches).
Nothing here imports another megatron-patch package (``tests/test_import_layers.py``).
"""
