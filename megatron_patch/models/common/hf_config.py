"""Shared HF ``config.json`` <-> Megatron argument mapping.

A field table (:class:`Field`, :class:`Arg`, :class:`Fixed` rows) states once how each
``config.json`` field and Megatron argument correspond; :func:`fields_to_megatron` and
:func:`fields_to_hf` read it in either direction. :data:`LLAMA_STYLE_FIELDS` is the table of the
llama-style decoder: Llama, Mistral, Qwen2 and Qwen3 differ only in a few switches (q/k/v bias,
per-head q/k norm, sliding window), so they share :func:`llama_style_to_megatron` /
:func:`megatron_to_llama_style`; other families add rows of their own (DeepSeek's MLA sizes).
GPT-style families (Bloom, Falcon, OPT, StarCoder, ChatGLM) write their tables with
:func:`decoder_fields`.
What is not one field to one argument (rope, windows) is code here or in the family.
Fields that would change the model but have no Megatron equivalent raise
:class:`UnsupportedConfigError` naming the field, never a silently different model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.models.common.rope import HF_ROPE_FIELDS, HF_ROPE_TYPES, USES_ORIGINAL_LENGTH

# Megatron's llama3 rope scaling hard-codes these (megatron.core RotaryEmbedding._apply_scaling);
# other llama3 constants go through --hf-rope-scaling.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def load_hf_config(hf_dir: str | Path) -> HFConfig:
    """Read ``config.json`` from an HF model directory with a clear error if absent."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a Hugging Face config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def require(hf: HFConfig, field: str) -> Any:
    """``hf[field]``, refusing a missing or null field, naming it."""
    if field not in hf or hf[field] is None:
        raise UnsupportedConfigError(f"config.json: required field {field!r} is missing")
    return hf[field]


def _expect(hf: HFConfig, field: str, allowed: tuple, default: Any) -> Any:
    value = hf.get(field, default)
    if value is None:
        value = default
    if value not in allowed:
        raise UnsupportedConfigError(
            f"config.json: {field}={value!r} is not supported (expected one of {list(allowed)})"
        )
    return value


def rope_parameters(hf: HFConfig) -> dict[str, Any]:
    """Rope settings from either transformers v5 ``rope_parameters`` or v4 ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _hf_rope_scaling(hf: HFConfig, rope: dict[str, Any]) -> dict[str, Any]:
    """The rope dict for ``--hf-rope-scaling`` (rope_theta aside), refusing what HF can't load."""
    kind = rope["rope_type"]
    missing = [key for key in HF_ROPE_FIELDS[kind] if key not in rope]
    if missing:
        raise UnsupportedConfigError(f"config.json: rope {kind} needs {missing[0]!r} in "
                                     "rope_parameters/rope_scaling")
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    if kind in USES_ORIGINAL_LENGTH and hf.get("original_max_position_embeddings"):
        # transformers prefers the top-level value (Phi-3 style) to the one in the rope dict.
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    if kind == "longrope":
        heads = int(require(hf, "num_attention_heads"))
        head_dim = int(hf.get("head_dim") or int(require(hf, "hidden_size")) // heads)
        pairs = int(head_dim * float(hf.get("partial_rotary_factor", 1.0))) // 2
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope[key], list) or len(rope[key]) != pairs:
                raise UnsupportedConfigError(
                    f"config.json: rope longrope {key} must be a list of {pairs} numbers "
                    f"(one per rotary channel pair), got {rope[key]!r}")
    return scaling


def rope_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron's rope arguments for an HF config: its own rope where it is exact, else
    ``hf_rope_scaling`` (:mod:`~megatron_patch.models.common.rope`)."""
    rope = rope_parameters(hf)
    theta = float(rope["rope_theta"])
    args: MegatronArgs = {
        "position_embedding_type": "rope",
        "rotary_base": int(theta) if theta.is_integer() else theta,
        "rotary_percent": float(hf.get("partial_rotary_factor", 1.0)),
    }
    kind = rope["rope_type"]
    if kind == "default":
        return args
    if kind == "linear":
        return {**args, "rotary_seq_len_interpolation_factor": float(rope["factor"])}
    if kind == "llama3" and all(float(rope.get(key, value)) == value
                                for key, value in _LLAMA3_FIXED.items()):
        # Llama 3.1's constants: Megatron-Core's own llama3 scaling (fused rope kernels too).
        return {**args, "use_rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}
    if kind in HF_ROPE_TYPES:
        return {**args, "hf_rope_scaling": _hf_rope_scaling(hf, rope)}
    raise UnsupportedConfigError(
        f"config.json: rope type {kind!r} is not supported "
        f"(default, linear, {', '.join(HF_ROPE_TYPES)})"
    )


def rope_to_hf(args: Any) -> dict[str, Any]:
    """HF ``rope_parameters`` for Megatron's rope arguments (inverse of the mapping above)."""
    theta = float(args.rotary_base)
    if getattr(args, "hf_rope_scaling", None):
        return {**args.hf_rope_scaling, "rope_theta": theta}
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
                **_LLAMA3_FIXED, "rope_theta": theta}
    if getattr(args, "rotary_seq_len_interpolation_factor", None):
        return {"rope_type": "linear", "factor": float(args.rotary_seq_len_interpolation_factor),
                "rope_theta": theta}
    return {"rope_type": "default", "rope_theta": theta}


# ---------------------------------------------------------------------------- field tables

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a Field's default: the field must be set


@dataclass(frozen=True)
class Field:
    """A ``config.json`` field and the Megatron argument it becomes, read and written by one row.

    ``also``: other spellings of the field, read in order after ``hf`` (written as ``hf``).
    ``values``: the supported values, any other is refused naming the field; a mapping also
    converts each to the argument's value. ``to_megatron`` / ``to_hf`` convert the value each way
    (None: unchanged). ``default``: the value of an absent or null field (in a bool row a null
    is false, as transformers reads it); REQUIRED refuses a missing or null field, naming it; a
    function of the arguments read by the rows above computes it, and then also stands in for a
    zero value (as transformers reads ``head_dim``). ``from_args``: the ``config.json`` value
    computed from all Megatron arguments, where the row's own argument does not give it alone.
    """

    hf: str
    megatron: str
    to_megatron: Callable[[Any], Any] | None = None
    to_hf: Callable[[Any], Any] | None = None
    default: Any = REQUIRED
    from_args: Callable[[Any], Any] | None = None
    also: tuple[str, ...] = ()
    values: Collection[Any] | None = None

    def _given(self, hf: HFConfig) -> Any:
        """The first of the field's spellings that ``hf`` sets (None: none is set)."""
        return next((hf[name] for name in (self.hf, *self.also) if hf.get(name) is not None),
                    None)

    def read(self, hf: HFConfig, args: MegatronArgs) -> Any:
        """The argument's value for ``hf`` (``args``: the values of the rows above)."""
        value = self._given(hf)
        if self.default is REQUIRED and value is None:
            value = require(hf, self.hf)
        elif isinstance(self.default, bool) and value is None:
            value = hf.get(self.hf, self.default)
        elif callable(self.default) and not value:
            value = self.default(args)
        elif value is None:
            value = self.default
        if self.values is not None:
            value = _expect(hf, self.hf, tuple(self.values), value)
            if isinstance(self.values, Mapping):
                value = self.values[value]
        return self.to_megatron(value) if self.to_megatron else value

    def check(self, hf: HFConfig) -> None:
        """Refuse an unsupported value of the field where ``hf`` sets it (before any other
        field is read, so the refusal names it even in a config that lacks others)."""
        value = self._given(hf)
        if self.values is not None and value is not None:
            _expect(hf, self.hf, tuple(self.values), value)

    def write(self, args: Any) -> Any:
        """The field's value for Megatron arguments ``args`` (a namespace)."""
        if self.from_args:
            return self.from_args(args)
        value = getattr(args, self.megatron)
        return self.to_hf(value) if self.to_hf else value


@dataclass(frozen=True)
class Arg:
    """A Megatron argument with no ``config.json`` field: a constant, or a function of the
    arguments the table's fields give. A family's switch overrides it in place."""

    megatron: str
    value: Any


@dataclass(frozen=True)
class Fixed:
    """A ``config.json`` field with no Megatron argument: any other value than ``value`` is
    refused (absent or null means ``value``), saying ``why`` where given, and it is written as
    ``value``."""

    hf: str
    value: Any
    why: str = ""

    def check(self, hf: HFConfig) -> None:
        """Refuse ``hf`` if it sets the field to another value, naming the field."""
        if not self.why:
            _expect(hf, self.hf, (self.value,), self.value)
        elif hf.get(self.hf) is not None and hf[self.hf] != self.value:
            raise UnsupportedConfigError(
                f"config.json: {self.hf}={hf[self.hf]!r} is not supported ({self.why})")


Row = Field | Arg | Fixed


def fields_to_megatron(hf: HFConfig, table: Iterable[Row], **own: Any) -> MegatronArgs:
    """Megatron argument values of ``hf`` by a field table, in the table's order.

    ``own``: values the family reads its own way; they replace the Arg rows of their arguments
    and the other Arg rows may use them.
    """
    table = tuple(table)
    for row in table:
        if isinstance(row, Fixed | Field):
            row.check(hf)
    args: MegatronArgs = {}
    for row in table:
        if isinstance(row, Field):
            args[row.megatron] = row.read(hf, args)
        elif isinstance(row, Arg):
            args[row.megatron] = None  # computed below, in the table's order
    args.update(own)
    for row in table:
        if isinstance(row, Arg) and row.megatron not in own:
            args[row.megatron] = row.value(args) if callable(row.value) else row.value
    return args


def fields_to_hf(args: Any, table: Iterable[Row]) -> HFConfig:
    """``config.json`` fields of Megatron arguments ``args`` by a field table."""
    config: HFConfig = {}
    for row in table:
        if isinstance(row, Field):
            config[row.hf] = row.write(args)
        elif isinstance(row, Fixed):
            config[row.hf] = row.value
    return config


def without(table: Iterable[Row], *hf_fields: str) -> tuple[Row, ...]:
    """``table`` less the rows of ``hf_fields`` (a family that reads them its own way)."""
    return tuple(row for row in table if getattr(row, "hf", None) not in hf_fields)


def key_value_heads(args: Any) -> int:
    """HF's key/value heads for Megatron arguments (``num_query_groups`` only counts with
    ``--group-query-attention``)."""
    return args.num_query_groups if args.group_query_attention else args.num_attention_heads


def _negate(value: Any) -> bool:
    return not value


def _query_heads(args: MegatronArgs) -> int:
    return args["num_attention_heads"]


def gpt_ffn_hidden_size(args: MegatronArgs) -> int:
    """``4 * hidden_size``: GPT's MLP width, where a config states none."""
    return 4 * args["hidden_size"]


def hidden_per_head(args: MegatronArgs) -> int:
    """``hidden_size / num_attention_heads``: the head size of a config that states none."""
    return args["hidden_size"] // args["num_attention_heads"]


# Rows that several families' tables share.
GROUP_QUERY_ATTENTION = Arg("group_query_attention",
                            lambda a: a["num_query_groups"] != a["num_attention_heads"])
KEY_VALUE_HEADS = Field("num_key_value_heads", "num_query_groups", int, default=_query_heads,
                        from_args=key_value_heads)
NUM_LAYERS = Field("num_hidden_layers", "num_layers", int)
HIDDEN_SIZE = Field("hidden_size", "hidden_size", int)
FFN_HIDDEN_SIZE = Field("intermediate_size", "ffn_hidden_size", int)
ATTENTION_HEADS = Field("num_attention_heads", "num_attention_heads", int)
VOCAB_SIZE = Field("vocab_size", "vocab_size", int)
ATTENTION_DROPOUT = Field("attention_dropout", "attention_dropout", float, default=0.0)
HIDDEN_DROPOUT = Field("hidden_dropout", "hidden_dropout", float, default=0.0)
INITIALIZER_RANGE = Field("initializer_range", "init_method_std", float, default=0.02)
TIED_EMBEDDINGS = Field("tie_word_embeddings", "untie_embeddings_and_output_weights", _negate,
                        _negate, default=True)

# The llama-style decoder, in the order of Megatron's flags. Family switches (q/k/v bias, q/k
# norm) override their Arg rows; rope and the sliding window are mapped by the code below.
LLAMA_STYLE_FIELDS: tuple[Row, ...] = (
    NUM_LAYERS,
    HIDDEN_SIZE,
    FFN_HIDDEN_SIZE,
    ATTENTION_HEADS,
    GROUP_QUERY_ATTENTION,
    KEY_VALUE_HEADS,
    Field("head_dim", "kv_channels", int, default=hidden_per_head),
    Fixed("hidden_act", "silu"),
    Field("max_position_embeddings", "max_position_embeddings", int, default=4096),
    Arg("normalization", "RMSNorm"),
    Field("rms_norm_eps", "layernorm_epsilon", float, default=1e-6),
    Arg("swiglu", True),
    Arg("add_bias_linear", False),
    Arg("add_qkv_bias", False),
    Arg("qk_layernorm", False),
    replace(TIED_EMBEDDINGS, default=False),
    VOCAB_SIZE,
    ATTENTION_DROPOUT,
    Arg("hidden_dropout", 0.0),
    INITIALIZER_RANGE,
)

# What a GPT-style decoder's config.json leaves implicit: multi-head attention, heads of
# hidden_size / heads channels, LayerNorm, a plain MLP, q/k/v biases as the other layers'.
_DECODER_ARGS: tuple[Arg, ...] = (
    Arg("num_query_groups", _query_heads),
    GROUP_QUERY_ATTENTION,
    Arg("kv_channels", hidden_per_head),
    Arg("normalization", "LayerNorm"),
    Arg("swiglu", False),
    Arg("add_qkv_bias", lambda a: a["add_bias_linear"]),
    Arg("qk_layernorm", False),
)


def decoder_fields(*rows: Row) -> tuple[Row, ...]:
    """A GPT-style decoder's field table: ``rows``, then the implicit arguments they leave."""
    given = {getattr(row, "megatron", None) for row in rows}
    return (*rows, *(arg for arg in _DECODER_ARGS if arg.megatron not in given))


def _effective_window(hf: HFConfig) -> int | None:
    """``sliding_window``, or None when it covers ``max_position_embeddings`` (a no-op)."""
    window = hf.get("sliding_window")
    if window is None or int(window) >= int(hf.get("max_position_embeddings", 0)):
        return None
    return int(window)


def mistral_window(hf: HFConfig) -> int | None:
    """Mistral: ``sliding_window`` applies to every layer (``layer_types`` is ignored by HF)."""
    return _effective_window(hf)


def qwen_window(hf: HFConfig) -> int | None:
    """Qwen2/3: a window only with ``use_sliding_window``, on the layers ``layer_types`` marks.

    Without ``layer_types`` (configs written before transformers 5) layers from
    ``max_window_layers`` on slide. Mixing full and sliding layers is not supported.
    """
    if not hf.get("use_sliding_window"):
        return None
    layers = int(require(hf, "num_hidden_layers"))
    first = int(hf.get("max_window_layers", 0))
    kinds = set(hf.get("layer_types") or
                ["full_attention"] * min(first, layers) + ["sliding_attention"] * (layers - first))
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        raise UnsupportedConfigError(
            f"config.json: layer_types/max_window_layers mix {sorted(kinds)}; only all-full or "
            "all-sliding attention is supported"
        )
    return _effective_window(hf)


def llama_style_to_megatron(
    hf: HFConfig,
    *,
    qkv_bias: bool = False,
    qk_layernorm: bool = False,
    window: Callable[[HFConfig], int | None] | None = None,
) -> MegatronArgs:
    """Map a llama-style HF config to Megatron argument values.

    ``qkv_bias``: the family always has a bias on q/k/v only (Qwen2). ``qk_layernorm``: per-head
    RMSNorm on q and k (Qwen3). ``window``: how the family reads its sliding window (HF
    semantics: the token and ``window - 1`` before it); None: the family has none.
    """
    for field in ("mlp_bias", "attention_bias"):
        if hf.get(field):
            raise UnsupportedConfigError(
                f"config.json: {field}=true is not supported (bias on o_proj/MLP)"
            )
    args = fields_to_megatron(hf, LLAMA_STYLE_FIELDS)
    window_tokens = window(hf) if window else None
    return {
        **args,
        "add_qkv_bias": qkv_bias,
        "qk_layernorm": qk_layernorm,
        # Transformer Engine's (left, right) window: query i attends keys i-left .. i.
        "window_size": None if window_tokens is None else (window_tokens - 1, 0),
        **rope_to_megatron(hf),
    }


def megatron_window(args: Any) -> int | None:
    """HF ``sliding_window`` from Megatron's ``window_size`` (None: full attention)."""
    window = getattr(args, "window_size", None)
    return None if window is None else int(window[0]) + 1


def qwen_window_fields(args: Any) -> HFConfig:
    """Qwen2/3 ``config.json`` window fields for Megatron's ``window_size``."""
    window = megatron_window(args)
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0 if window else args.num_layers}


def megatron_to_llama_style(
    args: Any, architecture: str, model_type: str, **extra: Any
) -> HFConfig:
    """Inverse of :func:`llama_style_to_megatron`: an HF config dict from Megatron args.

    ``extra`` adds family-specific fields (e.g. Qwen3's ``attention_bias``).
    """
    rope = rope_to_hf(args)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        **fields_to_hf(args, LLAMA_STYLE_FIELDS),
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
    }
    if not math.isclose(args.rotary_percent, 1.0):
        config["partial_rotary_factor"] = args.rotary_percent
    return {**config, **extra}
