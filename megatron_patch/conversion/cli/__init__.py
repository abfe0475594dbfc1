"""The ``megatron-patch`` commands of conversion: ``convert`` (:mod:`.convert`), ``verify``
(:mod:`.verify`, its ``--layers`` / ``--train-steps`` modes in :mod:`.fidelity`) and ``card``
(:mod:`.card`)."""
