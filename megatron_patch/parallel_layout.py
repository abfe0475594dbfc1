"""A parallel layout and every rule it must meet for a model, held once.

The launcher (``launch/command.py``), ``plan`` (``launch/plan.py``), Megatron's argument checks
(``config_checks.py``) and conversion (``conversion/hf_to_mcore.py``,
``conversion/verify/card.py``) build a :class:`ParallelLayout` of the sizes they know and ask it
for its :meth:`ParallelLayout.problems` with the model's Megatron argument values; the memory
model (``launch/memory.py``) takes its derived sizes (DP, micro-batches, expert DP) from it.
A :class:`Problem` is data (the rule, the sizes at fault, the model field, the fix); each caller
renders it with its own :class:`Wording`, so the launcher says ``TP=3``, Megatron's checks
``--tensor-model-parallel-size 3`` and the converter ``--tp 3``.

Sizes a caller does not know stay None and the rules that need them are not checked (the
converter knows no process count or batch; a dry run of the launcher assumes its process count,
and reports :attr:`Problem.needs_world` problems as notes). What a caller refuses depends on
:attr:`Problem.kind`:

- :data:`REFUSED`: Megatron-Core refuses the layout (``validate_args``, ``TransformerConfig``,
  the parallel state, the pipeline schedule) or cannot split a layer's weights. Every caller
  refuses it.
- :data:`UNUSED`: a setting with no effect (SP at TP=1, which Megatron turns off with a
  warning; ETP on a model without experts). The launcher and the converter refuse it as a
  mistake; Megatron's own checks leave it to Megatron.
- :data:`TRAINING`: only a training step of a text model fails (Megatron-Core's MoE layer
  refuses EP with TP but without SP in training mode; a sequence that does not split over TP
  with SP). The launcher refuses it; Megatron's argument checks also serve forward-only
  verification and vision-language models (which pad their sequences), so they leave it to
  Megatron.

The key/value-head rule is :mod:`megatron_patch.models.common.head_split`'s.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_patch.models.common.head_split import model_kv_split_problem

REFUSED, UNUSED, TRAINING = "refused", "unused", "training"


@dataclass(frozen=True)
class Rule:
    """How a problem of one rule reads: ``text`` and ``fix`` are templates (:class:`Wording`
    fills them)."""

    text: str
    fix: str = ""


# Templates: ``{tp}`` is a size as the caller words it (``TP=2``, ``--tp 2``), ``{tp:name}`` its
# name alone, ``{tp:on}`` a switch turned on, ``{pp:>1}`` "more than one", ``{product:tp,pp}`` the
# sizes multiplied, ``{field}`` the model field with its value, ``{field:also}`` the field where
# the caller's model fields are flags too (Megatron's), other names the problem's facts. A fix
# naming something the caller does not have (e.g. uneven pipeline stages) is left out.
RULES: dict[str, Rule] = {
    "world": Rule("{world} processes are not divisible by {product:tp,pp,cp}"),
    "heads": Rule("{tp} must divide {field}"),
    "kv_heads": Rule("{tp}{field:also}: {detail}"),
    "ffn": Rule("{tp} must divide {field}"),
    "layers": Rule("{pp} must divide {field}", "(or give {uneven:name})"),
    "virtual_layers": Rule("{product:pp,vpp} must divide {field}", "(or give {uneven:name})"),
    "virtual_needs_pipeline": Rule("{vpp} (an interleaved pipeline) needs {pp:>1}"),
    "sp_needs_tp": Rule("{sp:on} needs {tp:>1}"),
    "sp_sequence": Rule("{sp:on} splits the sequence over {tp:name}: {seq} must be a multiple "
                        "of {tp}"),
    "cp_sequence": Rule("{cp} splits each sequence into {chunks} chunks: {seq} must be a "
                        "multiple of {chunks}"),
    "experts_needed": Rule("{ep}/{etp} need a mixture-of-experts model; {model} has no routed "
                           "experts"),
    "experts": Rule("{ep} must divide {field}"),
    "expert_ffn": Rule("{expert_tp} must divide {field}"),
    "expert_world": Rule("{world} processes are not divisible by {product:ep,expert_tp,pp}"),
    "ep_tp_needs_sp": Rule("{ep} with {tp} needs {sp:on}",
                           "(Megatron's expert dispatch expects sequence-parallel tokens)"),
    "batch": Rule("{global_batch} must be a multiple of {product:micro_batch,dp}"),
    "virtual_microbatches": Rule("{vpp} needs the {microbatches} micro-batches per step "
                                 "({global_batch} over {product:micro_batch,dp}) to be a "
                                 "multiple of {pp}"),
}


@dataclass(frozen=True)
class Problem:
    """One rule a layout breaks for a model.

    Attributes:
        rule: the key of :data:`RULES`.
        sizes: the layout's sizes involved, by key (``tp``, ``pp``, ``vpp``, ``cp``, ``ep``,
            ``etp``, ``expert_tp``, ``sp``, ``dp``, ``micro_batch``, ``global_batch``, ``seq``),
            with their values.
        field: the model's Megatron argument involved (``num_attention_heads``), if any.
        value: its value.
        kind: :data:`REFUSED`, :data:`UNUSED` or :data:`TRAINING` (see the module docstring).
        needs_world: decided from the process count (a dry run may only assume it).
        facts: further numbers of the message (``world``, ``chunks``, ``detail``, ...).
    """

    rule: str
    sizes: Mapping[str, Any]
    field: str | None = None
    value: Any = None
    kind: str = REFUSED
    needs_world: bool = False
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def message(self, wording: Wording) -> str:
        """The problem in ``wording``'s names, with its fix where the caller has one."""
        rule = RULES[self.rule]
        text = _Template(wording, self).format(rule.text)
        if rule.fix:
            try:
                text += " " + _Template(wording, self).format(rule.fix)
            except KeyError:  # the fix names what this caller does not offer
                pass
        return text


class Wording:
    """How a caller names the sizes and the model's fields: as command-line flags.

    ``names``: size key -> flag (``{"tp": "--tp"}``), or a phrase with ``{}`` for the value
    (``{"dp": "{} data-parallel ranks"}``); non-size keys name options a fix may mention
    (``uneven``: how to give uneven pipeline stages). ``fields``: Megatron argument -> phrase
    with ``{}`` for the value (default ``name=value``). ``model``: how the model is named.
    ``fields_are_flags``: the model's fields are flags of the same command (Megatron's), so a
    problem names them beside the sizes.
    """

    def __init__(self, names: Mapping[str, str], fields: Mapping[str, str] | None = None,
                 model: str = "the model", fields_are_flags: bool = False):
        self.names, self.fields = dict(names), dict(fields or {})
        self.model, self.fields_are_flags = model, fields_are_flags

    def name(self, key: str) -> str:
        """The size's (or option's) name alone."""
        return self.names[key].replace("{}", "").strip()

    def size(self, key: str, value: Any) -> str:
        """A size with its value (``--tp 2``; a switch: its flag, or ``no`` and its flag)."""
        name = self.names[key]
        if "{}" in name:
            return name.format(value)
        if isinstance(value, bool):
            return name if value else f"no {name}"
        return f"{name} {value}"

    def more_than_one(self, key: str) -> str:
        """``--pp > 1``."""
        return f"{self.name(key)} > 1"

    def product(self, sizes: Mapping[str, Any]) -> str:
        """``--tp 2 x --pp 2 = 4``."""
        return (" x ".join(self.size(k, v) for k, v in sizes.items())
                + f" = {math.prod(sizes.values())}")

    def field(self, name: str, value: Any) -> str:
        """A model field with its value."""
        return self.fields.get(name, f"{name}={{}}").format(value)


class LauncherWording(Wording):
    """The launcher's ``NAME=value`` settings (``TP=2``, ``SP=true``, ``PP*VPP=2*2``)."""

    def size(self, key: str, value: Any) -> str:
        """``TP=2``, ``SP=true``."""
        shown = str(value).lower() if isinstance(value, bool) else value
        return f"{self.names[key]}={shown}"

    def more_than_one(self, key: str) -> str:
        """``PP>1``."""
        return f"{self.names[key]}>1"

    def product(self, sizes: Mapping[str, Any]) -> str:
        """``TP*PP*CP=2*1*1``."""
        return ("*".join(self.names[k] for k in sizes) + "="
                + "*".join(str(v) for v in sizes.values()))


class _Template(string.Formatter):
    """Fills a :data:`RULES` template from a problem in a caller's wording."""

    def __init__(self, wording: Wording, problem: Problem):
        self.wording, self.problem = wording, problem

    def get_value(self, key, args, kwargs):
        return key

    def format_field(self, key: str, spec: str) -> str:
        w, p = self.wording, self.problem
        if key == "field":
            shown = w.field(p.field, p.value)
            if spec == "also":
                return f" with {shown}" if w.fields_are_flags else ""
            return shown
        if key == "product":
            return w.product({k: p.sizes[k] for k in spec.split(",")})
        if key == "model":
            return w.model
        if key in p.facts:
            return str(p.facts[key])
        if spec == "name":
            return w.name(key)
        if spec == "on":
            return w.size(key, True)
        if spec == ">1":
            return w.more_than_one(key)
        return w.size(key, p.sizes[key])


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of a run, a conversion or a launch; None where a caller does not
    know a size (its rules are then not checked).

    Attributes:
        tp, pp, cp, ep: tensor, pipeline, context and expert parallel sizes.
        vpp: virtual pipeline stages per pipeline rank (None: no interleaved pipeline).
        etp: expert tensor parallel size as given (None: TP, Megatron's default).
        sp: sequence parallelism (None: not known, e.g. when converting).
        world: the process count.
        micro_batch, global_batch: sequences per micro-batch and per optimizer step.
        seq: the sequence length of a micro-batch.
        uneven: the layers are placed by first/last-stage layer counts or a pipeline layout,
            so PP (and VPP) need not divide them.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    sp: bool | None = False
    world: int | None = None
    micro_batch: int | None = None
    global_batch: int | None = None
    seq: int | None = None
    uneven: bool = False

    @property
    def expert_tp(self) -> int:
        """The expert tensor parallel size in effect."""
        return self.tp if self.etp is None else self.etp

    @property
    def model_parallel(self) -> int:
        """Processes of one model replica: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def expert_model_parallel(self) -> int:
        """Processes of one replica of the experts: EP x expert TP x PP."""
        return self.ep * self.expert_tp * self.pp

    @property
    def expert_dp(self) -> int | None:
        """Data-parallel replicas of each expert (the process count over
        :attr:`expert_model_parallel`, rounded down), where the process count is known."""
        return None if self.world is None else self.world // self.expert_model_parallel

    @classmethod
    def of_replicas(cls, dp: int, **sizes: Any) -> ParallelLayout:
        """The layout of ``dp`` data-parallel replicas of ``sizes`` (world: DP x TP x PP x CP)."""
        replica = cls(**sizes)
        return dataclasses.replace(replica, world=dp * replica.model_parallel)

    @property
    def dp(self) -> int | None:
        """Data-parallel replicas, where the process count is known and divides."""
        if self.world is None or self.world % self.model_parallel:
            return None
        return self.world // self.model_parallel

    @property
    def microbatches(self) -> int | None:
        """Micro-batches per optimizer step, where known."""
        dp = self.dp
        if None in (dp, self.micro_batch, self.global_batch):
            return None
        return self.global_batch // (self.micro_batch * dp)

    def problems(self, model: Mapping[str, Any]) -> list[Problem]:
        """Every rule this layout breaks for ``model`` (Megatron argument values: a family
        mapping's, or Megatron's parsed flags), in the order the launcher reports them."""
        found: list[Problem] = []

        def add(rule: str, sizes: tuple[str, ...], field: str | None = None, kind: str = REFUSED,
                **facts: Any) -> None:
            # A problem given the process count (``world``) is decided by it.
            found.append(Problem(rule, {k: getattr(self, k) for k in sizes}, field,
                                 model.get(field) if field else None, kind,
                                 "world" in facts, facts))

        tp, pp, vpp, world = self.tp, self.pp, self.vpp, self.world
        heads, layers = model.get("num_attention_heads"), model.get("num_layers")
        experts = model.get("num_experts")
        if world is not None and world % self.model_parallel:
            add("world", ("tp", "pp", "cp"), world=world)
        if heads and heads % tp:
            add("heads", ("tp",), "num_attention_heads")
        kv_problem = model_kv_split_problem(model, tp)
        if kv_problem:
            found.append(Problem("kv_heads", {"tp": tp}, "num_query_groups",
                                 _query_groups(model), facts={"detail": kv_problem}))
        if model.get("ffn_hidden_size") and model["ffn_hidden_size"] % tp:
            add("ffn", ("tp",), "ffn_hidden_size")
        if layers and not self.uneven and layers % pp:
            add("layers", ("pp",), "num_layers")
        elif layers and not self.uneven and vpp and pp > 1 and layers % (pp * vpp):
            add("virtual_layers", ("pp", "vpp"), "num_layers")
        if vpp is not None and pp == 1:
            add("virtual_needs_pipeline", ("vpp", "pp"))
        if self.sp and tp == 1:
            add("sp_needs_tp", ("sp", "tp"), kind=UNUSED)
        if self.sp and tp > 1 and self.seq is not None and self.seq % tp:
            add("sp_sequence", ("sp", "tp", "seq"), kind=TRAINING)
        if self.cp > 1 and self.seq is not None and self.seq % (2 * self.cp):
            add("cp_sequence", ("cp", "seq"), chunks=2 * self.cp)
        if not experts and (self.ep > 1 or self.etp is not None):
            add("experts_needed", ("ep", "etp"), kind=REFUSED if self.ep > 1 else UNUSED)
        if experts and experts % self.ep:
            add("experts", ("ep",), "num_experts")
        expert_ffn = "moe_ffn_hidden_size" if model.get("moe_ffn_hidden_size") \
            else "ffn_hidden_size"  # Megatron's default for the experts' FFN
        if experts and model.get(expert_ffn) and model[expert_ffn] % self.expert_tp:
            add("expert_ffn", ("expert_tp",), expert_ffn)
        if world is not None and (self.ep > 1 or self.etp is not None) \
                and world % self.expert_model_parallel:
            add("expert_world", ("ep", "expert_tp", "pp"), world=world)
        if experts and self.ep > 1 and tp > 1 and self.sp is False:
            add("ep_tp_needs_sp", ("ep", "tp", "sp"), kind=TRAINING)
        dp = self.dp
        if dp is not None and self.global_batch and self.micro_batch \
                and self.global_batch % (self.micro_batch * dp):
            add("batch", ("global_batch", "micro_batch", "dp"), world=world)
        microbatches = self.microbatches
        # Megatron's interleaved schedule runs the micro-batches in groups of PP (its default
        # group size, which the training arguments keep).
        if vpp and pp > 1 and microbatches is not None and microbatches % pp:
            add("virtual_microbatches", ("vpp", "pp", "global_batch", "micro_batch", "dp"),
                world=world, microbatches=microbatches)
        return found


def _query_groups(model: Mapping[str, Any]) -> int | None:
    """Key/value heads of a model's Megatron arguments (the attention heads without GQA)."""
    heads = model.get("num_attention_heads")
    if not model.get("group_query_attention", True):
        return heads
    return model.get("num_query_groups") or heads
