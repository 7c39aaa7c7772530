"""`TrimConfig`: what to trim and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from crosstrim.core.methods import get_method, method_names


@dataclass(frozen=True)
class TrimConfig:
    """How crosstrim selects the image features that later cross-attention layers see.

    Two budgets, exactly one of which applies:

    * ``k_ratio`` (``method="trimmed"`` only, the paper's rule): every attention head of the first
      cross-attention layer keeps its top ``ceil(k_ratio * valid tokens)`` image tokens and the union
      over heads is kept. The kept fraction therefore *adapts* to the input: heads that agree keep
      little, heads that disagree keep more.
    * ``keep_ratio``: exactly ``ceil(keep_ratio * valid tokens)`` tokens of every image are kept. This
      is how the baselines run and how methods are compared at equal cost.

    ``1.0`` for either ratio is the identity: nothing is dropped (padding tiles included), so the
    model's outputs are bit-identical to the unpatched model.

    The checks follow the method registry (:mod:`crosstrim.core.methods`): ``method`` is any registered
    name, ``k_ratio`` is accepted by adaptive methods only, and they default to it.

    Attributes:
        method: a registered method: ``"trimmed"`` (attention scores, union of per-head top-k; with ``keep_ratio`` the
            union is grown head-rank by head-rank until the budget is met), ``"mean"`` (scores
            summed over heads, one global top-k), ``"random"`` (seeded) or ``"uniform"`` (evenly
            strided positions inside every tile), or one registered with
            :func:`crosstrim.core.register_method`.
        k_ratio: per-head top-k fraction for ``method="trimmed"`` (an adaptive method); defaults to 0.25 (the paper's
            main setting) when neither ratio is given.
        keep_ratio: exact kept fraction; required by the baselines.
        seed: seed of the ``random`` baseline. Each sample draws from its own generator, seeded
            from ``seed``, the sample's non-padding token ids and its image layout, so a sample
            keeps the same tokens whatever batch, padding, process or call order it comes in
            (runs sharded over processes match a single process).
        trim_first_layer_cache: also shrink the first cross-attention layer's KV cache to the kept
            tokens after prefill, so decoding reads only kept features everywhere. Off by default,
            as in the paper: the first layer scores with all features and keeps them.
        summarize_dropped: not in the paper. Later cross-attention layers also attend one extra token
            per image that stands in for everything it dropped: the mean of the dropped features,
            with its attention logit raised by ``log(dropped count)`` so it receives about the
            attention they would have had (see :meth:`crosstrim.core.Selection.features`). Without it
            the kept tokens share all the attention, which skews anything read from attention shares
            (the testbed model over-counts). Costs one cached token per image and layer; needs
            ``trim_first_layer_cache=False``.
        score_chunk_elements: upper bound on the attention-probability elements materialised at
            once while scoring (query rows are processed in chunks), so scoring a long prompt
            on a large batch never allocates gigabytes.
    """

    method: str = "trimmed"
    k_ratio: float | None = None
    keep_ratio: float | None = None
    seed: int = 0
    trim_first_layer_cache: bool = False
    summarize_dropped: bool = False
    score_chunk_elements: int = 1 << 25

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        chosen = get_method(self.method)
        if self.k_ratio is not None and self.keep_ratio is not None:
            raise ValueError("give either k_ratio (adaptive, per-head top-k) or keep_ratio (exact budget), not both")
        if chosen.adaptive and self.k_ratio is None and self.keep_ratio is None:
            object.__setattr__(self, "k_ratio", chosen.default_k_ratio)
        if not chosen.adaptive and self.k_ratio is not None:
            adaptive = ", ".join(repr(name) for name in method_names() if get_method(name).adaptive)
            raise ValueError(f"k_ratio applies to method={adaptive} only; use keep_ratio with method={self.method!r}")
        if not chosen.adaptive and self.keep_ratio is None:
            raise ValueError(f"method={self.method!r} needs keep_ratio, e.g. keep_ratio=0.5")
        for name in ("k_ratio", "keep_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__}")
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value}; e.g. {name}=0.25")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.trim_first_layer_cache, bool):
            raise TypeError("trim_first_layer_cache must be True or False")
        if not isinstance(self.summarize_dropped, bool):
            raise TypeError("summarize_dropped must be True or False")
        if self.summarize_dropped and self.trim_first_layer_cache:
            raise ValueError(
                "summarize_dropped adds a summary token to the later layers only; the first layer's cache "
                "must keep every token (turn trim_first_layer_cache off)"
            )
        if isinstance(self.score_chunk_elements, bool) or not isinstance(self.score_chunk_elements, int):
            raise TypeError("score_chunk_elements must be an int")
        if self.score_chunk_elements < 1:
            raise ValueError(f"score_chunk_elements must be >= 1, got {self.score_chunk_elements}")

    @property
    def ratio(self) -> float:
        """The budget ratio in force (``k_ratio`` or ``keep_ratio``)."""
        return self.k_ratio if self.k_ratio is not None else self.keep_ratio  # type: ignore[return-value]

    @property
    def is_identity(self) -> bool:
        """True when nothing is trimmed (ratio 1.0)."""
        return self.ratio == 1.0

    @property
    def needs_scores(self) -> bool:
        """Whether selection reads attention scores (the random/uniform baselines do not)."""
        return get_method(self.method).needs_scores and not self.is_identity

    @property
    def needs_seeds(self) -> bool:
        """Whether selection reads one seed per sample (the random baseline does)."""
        return get_method(self.method).needs_seeds and not self.is_identity

    def describe(self) -> str:
        """A short label such as ``trimmed k=0.25`` for tables and logs."""
        budget = f"k={self.k_ratio:g}" if self.k_ratio is not None else f"keep={self.keep_ratio:g}"
        return f"{self.method} {budget}" + (" +summary" if self.summarize_dropped else "")

    @classmethod
    def from_options(cls, options: Mapping[str, object], names: Mapping[str, str] | None = None) -> TrimConfig:
        """The config that option values describe, as a command line, a config file or another framework
        passes them: the one parser of options for every caller.

        ``options`` maps field names to strings (``"0.25"``, ``"false"``) or typed values (``0.25``,
        ``False``); ``None`` means not given (the field's default). Parsing is strict, because a lenient
        one silently changes the experiment: a boolean is ``true``/``false``, ``1``/``0`` or ``yes``/``no``
        (any case) or a real bool, so ``"False"`` is False (``bool("False")`` is True); a number must
        parse whole and an ``int`` field takes no fraction; an unknown option is refused with the valid
        ones. ``names`` maps a field to the caller's spelling of it (``{"keep_ratio": "--keep-ratio"}``),
        and every error, the config's own checks included, names the option as the user typed it.

        Raises:
            ValueError: naming the option and what it accepts.
        """
        names = dict(names or {})
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = [key for key in options if key not in fields]
        if unknown:
            valid = ", ".join(names.get(name, name) for name in fields)
            raise ValueError(f"unknown option {unknown[0]!r}; valid options: {valid}")
        values = {}
        for key, value in options.items():
            if value is not None:
                parse = _OPTION_PARSERS.get(key if key == "method" else str(fields[key].type), _as_given)
                values[key] = parse(value, names.get(key, key))
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(_spelled(str(err), names)) from err


# -- option parsing (TrimConfig.from_options) ---------------------------------------------------------

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _boolean(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")


def _integer(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def _number(value: object, name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a number, got {value!r}")


def _method(value: object, name: str) -> str:
    if isinstance(value, str) and value.strip() in method_names():
        return value.strip()
    raise ValueError(f"{name}: unknown method {value!r}; choose one of {', '.join(method_names())}")


def _as_given(value: object, name: str) -> object:
    return value


# Parser per field annotation (a string: this module uses postponed annotations); ``method`` by name.
_OPTION_PARSERS = {"bool": _boolean, "int": _integer, "float | None": _number, "method": _method}


def _spelled(message: str, names: Mapping[str, str]) -> str:
    """``message`` with every field named as the caller spells it: names with an underscore wherever they
    stand alone, the one-word ones (``method``, ``seed``) only where assigned (``method='mean'``), since
    elsewhere they are plain words."""
    for field, spelling in names.items():
        ahead = r"(?![\w])" if "_" in field else r"(?==)"
        message = re.sub(rf"(?<![\w-]){re.escape(field)}{ahead}", lambda _, to=spelling: to, message)
    return message
