"""The engine: Trimmed Llama on a stock transformers model, through forward hooks only.

How it hooks in (no modeling code is copied or replaced, attention stays sdpa):

* the text decoder's pre-hook notes this call's attention mask (2-D, or 4-D with a static cache) and cache;
* hooks on the modules that compute the first cross-attention layer's queries and keys (the model
  adapter names them: ``q_norm``/``k_norm`` in Mllama) capture what the layer itself computes, and
  the layer's post-hook scores image tokens from them and selects;
* every later cross-attention layer's pre-hook swaps in the gathered features and the gathered
  cross-attention mask, so its projections and its KV cache cover only kept tokens;
* at decode steps the selection is read back from the cache object it was stored on, and the
  full-width mask transformers rebuilds every step is gathered the same way.

What is specific to a model family (where the decoder and its cross layers are, the capture points,
the image-slot geometry) comes from its adapter (:mod:`crosstrim.adapters`); the selection from the
method registry (:mod:`crosstrim.core.methods`). Per-call state lives in a thread-local
:class:`_CallState`, so threads sharing one trimmed model do not see each other's calls. Every hook
point, attribute and argument read here is checked when the model is trimmed, and every prefill
checks that each trimmed layer got the gathered features and caches the kept width: a transformers
release that moves any of them fails loudly, never silently runs untrimmed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crosstrim import core
from crosstrim.adapters import ModelAdapter, adapter_for, drift
from crosstrim.core import Selection, TrimConfig
from crosstrim.engine import cache as checks
from crosstrim.engine.memory import cross_kv_bytes, layer_kv_bytes, trimmed_cross_layers
from crosstrim.engine.stats import FirstLayerScores, TrimStats

# Where a trimmed model keeps its handle (on the text decoder) and a prefill its selection (on its cache).
HANDLE_ATTR = "_crosstrim_handle"
SELECTION_ATTR = "_crosstrim_selection"


@dataclass
class _Step:
    """State of one decoder forward call; later cross layers share the gathered tensors."""

    attention_mask: torch.Tensor | None  # as the decoder got it: 2-D, or 4-D with a static cache
    cache: Any
    input_ids: torch.Tensor | None = None
    images: bool = False  # the call carries image features (a prefill)
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    selection: Selection | None = None  # the prefill's, also stored on its cache for the decode steps
    prefill: bool = False
    gathered: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)
    received: set[int] = field(default_factory=set)  # later layers that got the gathered features


class _CallState(threading.local):
    """What belongs to a call, per thread: the running decoder call, the last prefill's stats and scores.

    Threads sharing one trimmed model each see their own calls, so no call reads another's
    captured queries, selection or gathered tensors, and ``TrimHandle.stats`` is the calling
    thread's last prefill.
    """

    step: _Step | None = None
    stats: TrimStats | None = None
    scores: FirstLayerScores | None = None


class TrimHandle:
    """A model patched by :func:`trim`. ``stats`` describes the last prefill; ``remove()`` undoes it.

    Set ``record_scores = True`` to also keep the first cross-attention layer's per-head scores of
    every prefill in ``scores`` (a :class:`FirstLayerScores`, computed even by methods and ratios
    that select without them); off by default, so the hot path stores nothing extra.

    ``copy.deepcopy`` of a trimmed model gives a trimmed copy with its own handle (its hooks are
    bound methods, copied with the model), reachable as ``TrimHandle.of(copy)``.
    """

    def __init__(self, model: nn.Module, config: TrimConfig) -> None:
        adapter = adapter_for(model)
        text = adapter.decoder(model)
        if getattr(text, HANDLE_ATTR, None) is not None:
            raise ValueError("this model is already trimmed; call handle.remove() before trimming it again")
        layers = adapter.cross_layers(text)
        self.model = model
        self.config = config
        self.record_scores = False
        self.adapter: ModelAdapter = adapter
        self._text = text
        self._layers = layers
        # Layers whose cache holds only the kept tokens after prefill (and whose decode masks are gathered).
        self._trimmed = list(trimmed_cross_layers(layers, config.trim_first_layer_cache))
        self._segment = adapter.image_slot_tokens(model)
        self._calls = _CallState()
        first = text.layers[layers[0]]
        query, key = adapter.capture_points(text, layers[0])
        # Bound methods (not closures), so that copy.deepcopy(model) binds the copy's hooks to its own handle.
        self._hooks = [
            text.register_forward_pre_hook(self._begin, with_kwargs=True),
            text.register_forward_hook(self._end, with_kwargs=True, always_call=True),
            query.register_forward_hook(self._capture_query),
            key.register_forward_hook(self._capture_key),
            first.register_forward_hook(self._select, with_kwargs=True),
        ]
        for idx in self._trimmed:
            gather = functools.partial(self._gather, idx)
            self._hooks.append(text.layers[idx].register_forward_pre_hook(gather, with_kwargs=True))
        self._own_generate = model.__dict__.get("generate")
        model.generate = self._generate
        setattr(text, HANDLE_ATTR, self)

    @staticmethod
    def of(model: nn.Module) -> TrimHandle | None:
        """The handle trimming ``model`` (e.g. a ``copy.deepcopy`` of a trimmed model), or ``None``."""
        return getattr(adapter_for(model).decoder(model), HANDLE_ATTR, None)

    @property
    def cross_layers(self) -> list[int]:
        """The decoder's cross-attention layers, ascending (the first one scores and selects)."""
        return list(self._layers)

    @property
    def trimmed_layers(self) -> list[int]:
        """The cross layers whose cache holds only the kept tokens after prefill."""
        return list(self._trimmed)

    def record(self, stats: TrimStats | None, scores: FirstLayerScores | None) -> None:
        """Set the calling thread's last-prefill ``stats`` and ``scores`` (``crosstrim.generate`` records the
        merged ones of its micro-batched prefill)."""
        self._calls.stats, self._calls.scores = stats, scores

    @property
    def stats(self) -> TrimStats | None:
        """What the calling thread's last prefill kept (``None`` before its first image prefill).

        Per thread, so that threads sharing one trimmed model each read their own call's stats.
        """
        return self._calls.stats

    @property
    def scores(self) -> FirstLayerScores | None:
        """The first cross-attention layer's scores at the calling thread's last prefill.

        ``None`` unless that prefill ran with ``record_scores`` set. Per thread, as :attr:`stats`.
        """
        return self._calls.scores

    def kept_slots(self, cross_attention_mask: torch.Tensor | None, attention_mask: torch.Tensor | None) -> int | None:
        """``K``, the kept slots a prefill of these processor inputs selects, known before it runs.

        Fixed-ratio methods keep ``ceil(ratio * valid)`` tokens of every image, and an image's valid
        tokens are its tiles that some real text row may attend (the processor's ``(B, L, images,
        tiles)`` mask), so a batch's trimmed cache layers can be allocated at their final width
        before its prefill (``crosstrim.generate``). ``None`` when the count adapts to the scores
        (``k_ratio``) or the inputs do not say.
        """
        if cross_attention_mask is None or cross_attention_mask.dim() != 4:
            return None
        images, tiles = cross_attention_mask.shape[2:]
        patches = self._segment // tiles  # tokens per tile: an image slot is every tile's tokens
        if self.config.is_identity:
            return images * tiles * patches  # ratio 1.0 keeps every slot, padding tiles too
        if self.config.k_ratio is not None:
            return None
        allowed = cross_attention_mask == 1
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed &= attention_mask[:, :, None, None].to(allowed.device) != 0
        return core.fixed_kept_slots(allowed.any(1).sum(-1) * patches, self.config.ratio)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_calls"]  # thread-local, belongs to the calls of the original; a copy starts fresh
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._calls = _CallState()

    # -- lifecycle -----------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it computed before :func:`trim`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._calls.step = None
        if self.model.__dict__.get("generate") == self._generate:
            if self._own_generate is None:
                del self.model.generate
            else:
                self.model.generate = self._own_generate
        if getattr(self._text, HANDLE_ATTR, None) is self:
            setattr(self._text, HANDLE_ATTR, None)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    # -- hooks -----------------------------------------------------------------------------------

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate``, refusing ``use_cache=False``: without a cache every step would be a new
        prefill that selects again, scoring with the generated tokens too."""
        # As generate resolves it: the keyword, else the passed config, else the model's (unset means True).
        configs = (kwargs.get("generation_config"), self.model.generation_config)
        settings = [kwargs.get("use_cache"), *(getattr(c, "use_cache", None) for c in configs)]
        if next((s for s in settings if s is not None), True) is False:
            raise ValueError(
                "crosstrim selects image tokens once, at prefill, and keeps the selection on the KV cache; "
                "generate(use_cache=False) would select again at every step from the prompt plus the generated "
                "tokens. Use use_cache=True (the default)"
            )
        generate = self._own_generate or type(self.model).generate.__get__(self.model)
        return generate(*args, **kwargs)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Under torch.compile the data-dependent selection graph-breaks and runs eagerly, so
        # compiled models work; a static cache is re-sized to a fixed budget's width at the prefill.
        if module.training:
            raise RuntimeError(
                "crosstrim trims for inference, but the model is in training mode (dropout, and gradient "
                "checkpointing re-running layers under the selection hooks); call model.eval() first"
            )
        cache = checks.cache_of(kwargs)
        if not self.config.is_identity:
            checks.check_cache(cache, self._layers, self._trimmed, self._static_refusal)
        ids = kwargs.get("input_ids", args[0] if args else None)
        images = kwargs.get("cross_attention_states") is not None
        if not images and (cache is None or not _cached_length(cache)):
            self.record(None, None)  # a text-only prefill: the stats of an earlier image prefill are not its own
        self._calls.step = _Step(attention_mask=kwargs.get("attention_mask"), cache=cache, input_ids=ids, images=images)

    def _capture_query(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        step = self._calls.step
        if step is not None:
            step.query = output

    def _capture_key(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        step = self._calls.step
        if step is not None:
            step.key = output

    def _select(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step = self._calls.step
        states = kwargs.get("cross_attention_states")
        if step is None or states is None:
            return  # decode step: the first layer reads its cache
        scoring = self.config.needs_scores or self.record_scores
        if scoring and (step.query is None or step.key is None):
            raise drift("the first cross-attention layer ran without calling `cross_attn.q_norm` / `k_norm`")
        mask = kwargs.get("cross_attention_mask")
        if mask is None:
            raise ValueError(
                "crosstrim needs the cross_attention_mask the Mllama processor returns; without it "
                "transformers' sdpa path treats cross-attention as causal. Pass cross_attention_mask"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        tokens = states.numel() // (batch * states.shape[-1])
        # Under accelerate's dispatch (device_map="auto" over several GPUs) this hook sees the kwargs
        # as passed to the layer, before they moved to its execution device, where the captured keys
        # live: select on that device.
        device = step.key.device if step.key is not None else mask.device
        mask = mask.to(device)
        real = _real_tokens(step.attention_mask, length)
        rows = core.scoring_rows(kwargs.get("full_text_row_masked_out_mask"), real, batch, length, device)
        valid = core.valid_tokens(mask, rows)
        scores = None
        if scoring:
            scaling, chunk = self.adapter.scaling(self._text, self._layers[0]), self.config.score_chunk_elements
            scores = core.attention_scores(step.query, step.key, mask, rows, scaling, chunk)
        self._calls.scores = FirstLayerScores(self._layers[0], scores, valid) if self.record_scores else None
        keep = torch.ones_like(valid) if self.config.is_identity else self._select_per_image(scores, valid, tokens)
        # A sample with no image keeps nothing: the batch keeps its trimmed width (README, "Batches").
        dropped = valid & ~keep if self.config.summarize_dropped and not self.config.is_identity else None
        step.selection = Selection.from_keep(keep, self._images(tokens), dropped)
        # The decoder creates a cache itself when the caller passed none: the layer sees the real one.
        cache = checks.cache_of(kwargs)
        step.cache = step.cache if cache is None else cache
        if not self.config.is_identity and self._static(step.cache):
            step.selection = self._fixed_width(step.cache, step.selection)
        step.prefill = True
        step.query = step.key = None
        valid_counts = valid.sum(-1).tolist()
        kept_counts = (keep & valid).sum(-1).tolist()  # over valid tokens: ratio 1.0 keeps padding slots too
        images = valid.view(batch, step.selection.images, -1).any(-1).sum(-1).tolist()
        self._calls.stats = self._stats(step.selection, kept_counts, valid_counts, images, states.dtype)
        if step.cache is not None:
            setattr(step.cache, SELECTION_ATTR, step.selection)

    @property
    def _static_refusal(self) -> str | None:
        """Why a static cache cannot hold the trimmed layers, or ``None``: it can under a fixed budget (the
        width is known before the prefill) that leaves the first layer's cache whole."""
        if self.config.k_ratio is not None:
            return "k_ratio keeps as many tokens as the scores select, not known before the prefill"
        if self.config.trim_first_layer_cache:
            return "trim_first_layer_cache cuts the first layer's cache after the prefill filled it at full width"
        return None

    def _static(self, cache: Any) -> bool:
        from transformers.cache_utils import StaticLayer

        layers = getattr(cache, "layers", None)
        return layers is not None and any(type(layers[idx]) is StaticLayer for idx in self._trimmed)

    def _fixed_width(self, cache: Any, selection: Selection) -> Selection:
        """A static cache's trimmed layers at the fixed budget's width, and ``selection`` padded to it.

        The width is what every image slot keeps when all its tiles are valid (``ceil(keep_ratio * tiles *
        tokens)`` per slot), so it depends on the number of image slots only: the same for every batch of
        that shape, as a compiled decode step wants. Images with fewer tiles keep fewer tokens; their
        remaining slots are masked padding (zero keys and values, dtype-min mask columns). transformers
        allocates the cross layers at every image token; each trimmed layer is re-created at the width
        before the prefill fills it (a layer already at that width is kept: generate resets and re-uses it).
        """
        from transformers.cache_utils import StaticLayer

        full = torch.full((1, selection.images), selection.full_tokens // selection.images)
        padded = selection.padded(core.fixed_kept_slots(full, self.config.ratio))
        for idx in self._trimmed:
            layer = cache.layers[idx]
            if type(layer) is StaticLayer and layer.max_cache_len != padded.width:
                cache.layers[idx] = StaticLayer(max_cache_len=padded.width)
        return padded

    def _select_per_image(self, scores: torch.Tensor | None, valid: torch.Tensor, tokens: int) -> torch.Tensor:
        """Apply the budget per image, so every image keeps its share (one image: the paper's rule)."""
        batch, images = valid.shape[0], self._images(tokens)
        seg = tokens // images
        flat_scores = None
        if scores is not None:
            heads = scores.shape[1]
            flat_scores = scores.view(batch, heads, images, seg).transpose(1, 2).reshape(batch * images, heads, seg)
        seeds = self._seeds(valid.view(batch, images, seg)) if self.config.needs_seeds else None
        keep = core.select(self.config, flat_scores, valid.reshape(batch * images, seg), seeds)
        return keep.reshape(batch, tokens)

    def _images(self, tokens: int) -> int:
        """Image slots in a row of ``tokens`` image tokens; a row that is not whole image slots is drift."""
        if tokens % self._segment:
            raise drift(
                f"the cross-attention states hold {tokens} image tokens per sample, not a multiple of one image "
                f"slot's {self._segment} (max_num_tiles x tokens per tile): crosstrim cannot tell the images apart"
            )
        return tokens // self._segment

    def _seeds(self, valid: torch.Tensor) -> list[int]:
        """One seed per (sample, image slot) for a method that needs seeds (the random baseline), from the sample alone
        (:func:`crosstrim.core.sample_seeds` of its non-padding prompt ids and its valid tokens), so the same
        sample keeps the same tokens in any batch, with any padding, in any process, however often the model
        ran before. Beams and ``num_return_sequences`` copies share their sample's ids, hence its selection.
        """
        step = self._calls.step
        if step is None or step.input_ids is None:
            raise ValueError(
                f"method={self.config.method!r} seeds every sample from its token ids; call the model with "
                "input_ids (not inputs_embeds)"
            )
        ids = step.input_ids.cpu()
        real = torch.ones_like(ids, dtype=torch.bool)
        mask = _real_tokens(step.attention_mask, ids.shape[1])
        if mask is not None:
            real = mask.cpu()
        valid = valid.cpu()
        seed = self.config.seed
        return [s for b in range(valid.shape[0]) for s in core.sample_seeds(seed, ids[b][real[b]].tolist(), valid[b])]

    def _gather(self, idx: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step = self._calls.step
        if step is None or self.config.is_identity:
            return None  # ratio 1.0 drops nothing: every layer runs as it would untrimmed
        states = kwargs.get("cross_attention_states")
        if states is not None:
            if idx == self._layers[0]:
                return None  # the first layer scores with every token
            selection = step.selection
            if selection is None:
                raise drift(f"cross-attention layer {idx} got image features but the first one did not select")
            step.received.add(idx)
        elif step.prefill:
            raise drift(f"cross-attention layer {idx} got no `cross_attention_states` keyword during prefill")
        else:
            selection = getattr(step.cache, SELECTION_ATTR, None)
            if selection is None:
                self._check_untrimmed(idx, checks.cache_of(kwargs), kwargs.get("cross_attention_mask"))
                return None  # a cache filled before trimming holds every token
        mask = kwargs.get("cross_attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        if selection.index.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"the batch changed from {selection.index.shape[0]} to {hidden.shape[0]} rows since prefill; "
                "crosstrim supports greedy, sampling and beam search, not generate modes that reshape the "
                "cache (contrastive search, assisted decoding)"
            )
        device = hidden.device
        kwargs = dict(kwargs)
        if mask is not None:
            if mask.shape[-1] != selection.full_tokens:
                raise ValueError(
                    f"cross_attention_mask covers {mask.shape[-1]} image tokens but the prefill had "
                    f"{selection.full_tokens}; start a new generation for a new image"
                )
            kwargs["cross_attention_mask"] = self._shared(step, "mask", device, lambda: selection.mask(mask))
        if states is not None:
            flat = states.reshape(hidden.shape[0], -1, states.shape[-1])
            kwargs["cross_attention_states"] = self._shared(step, "features", device, lambda: selection.features(flat))
        return args, kwargs

    @staticmethod
    def _check_untrimmed(idx: int, cache: Any, mask: torch.Tensor | None) -> None:
        """A decode step without a stored selection must find a full-width cache, or the selection was lost."""
        if cache is None or mask is None:
            return
        layers = getattr(cache, "layers", None)
        keys = getattr(layers[idx], "keys", None) if layers is not None and idx < len(layers) else None
        if keys is not None and keys.shape[-2] != mask.shape[-1]:
            raise drift(
                f"at a decode step, cross-attention layer {idx} caches {keys.shape[-2]} image tokens but the cache "
                f"object carries no crosstrim selection (mask over {mask.shape[-1]}): the cache was replaced"
            )

    @staticmethod
    def _shared(step: _Step, what: str, device: torch.device, make) -> torch.Tensor:
        """Compute the gathered ``what`` (``"mask"`` or ``"features"``) once per forward and device; all later
        layers reuse it."""
        key = (what, device)
        if key not in step.gathered:
            step.gathered[key] = make().to(device)
        return step.gathered[key]

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """After every decoder call, also one that raised (``always_call``): the call's state goes first."""
        step, self._calls.step = self._calls.step, None
        if step is None or output is None:
            return  # output is None when the forward raised: dropping the step released its tensors
        if step.images and step.selection is None:
            raise drift(f"the first cross-attention layer ({self._layers[0]}) got no `cross_attention_states` keyword")
        if not step.prefill or self.config.is_identity:
            return
        later = [idx for idx in self._layers[1:] if idx not in step.received]
        if later:
            raise drift(f"cross-attention layers {later} did not receive the gathered image features")
        if step.cache is None:
            return  # use_cache=False: nothing is kept
        selection = step.selection
        if self.config.trim_first_layer_cache:
            keys, values = checks.cached_kv(step.cache, self._layers[0])
            layer = step.cache.layers[self._layers[0]]
            layer.keys, layer.values = selection.cache(keys), selection.cache(values)
        for idx in self._trimmed:
            keys, values = checks.cached_kv(step.cache, idx)
            if keys.shape[-2] != selection.width or values.shape[-2] != selection.width:
                raise drift(
                    f"after prefill, cross-attention layer {idx} caches {keys.shape[-2]} image tokens, "
                    f"not the {selection.width} kept"
                )

    # -- accounting ------------------------------------------------------------------------------

    def _stats(
        self, selection: Selection, kept: list[int], valid: list[int], images: list[int], dtype: torch.dtype
    ) -> TrimStats:
        per_token = layer_kv_bytes(1, 1, *self.adapter.kv_shape(self._text), dtype.itemsize)
        layers, trimmed = len(self._layers), len(self._trimmed)
        held = functools.partial(
            cross_kv_bytes, per_token, batch=len(kept), cross_layers=layers, full_tokens=selection.full_tokens
        )
        index_cpu = selection.index.cpu()
        return TrimStats(
            method=self.config.describe(),
            kept_indices=tuple(index_cpu[b, :k] for b, k in enumerate(selection.slot_valid.sum(-1).tolist())),
            kept_counts=tuple(kept),
            valid_counts=tuple(valid),
            image_tokens=selection.full_tokens,
            cross_layers=len(self._layers),
            trimmed_layers=trimmed,
            kv_bytes_full=held(trimmed_layers=0, kept_width=None),
            kv_bytes_kept=held(trimmed_layers=trimmed, kept_width=selection.width),
            kv_bytes_per_token=per_token,
            summary_tokens=selection.summary_slots,
            image_counts=tuple(images),
            image_slots=selection.images,
        )


def _cached_length(cache: Any) -> int:
    """Tokens ``cache`` already holds (0 for a prefill's fresh cache)."""
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def _real_tokens(attention_mask: torch.Tensor | None, length: int | None) -> torch.Tensor | None:
    """``(B, length)`` bool, the call's tokens that are not padding, from the mask the decoder receives.

    generate passes the processor's 2-D mask with a dynamic cache, but a prepared 4-D ``(B, 1, L, KV)``
    mask with a static one (allowed: True, or 0 in an additive mask); there the last row, the prompt's
    last (real, under left padding) token, allows exactly the real tokens before it, which a prefill
    laid out from position 0.
    """
    if attention_mask is None or length is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:] != 0
    if attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1, :length]
        return last if last.dtype == torch.bool else last == 0
    return None


def trim(model: nn.Module, config: TrimConfig | None = None) -> TrimHandle:
    """Patch ``model`` in place so later cross-attention layers see only the kept image features.

    Works for forward calls and ``generate`` (greedy, sampling, beam search) in eval mode. Returns a
    handle whose ``stats`` describe the calling thread's last prefill and whose ``remove()`` restores
    the model. Raises ``RuntimeError`` when this transformers version lays Mllama out differently
    from what crosstrim hooks into.
    """
    if config is not None and not isinstance(config, TrimConfig):
        raise TypeError(f"config must be a crosstrim.TrimConfig, got {type(config).__name__}")
    return TrimHandle(model, config or TrimConfig())


@contextlib.contextmanager
def trimmed(model: nn.Module, config: TrimConfig | None = None) -> Iterator[TrimHandle]:
    """``with trimmed(model, cfg) as handle: ...`` trims inside the block only."""
    handle = trim(model, config)
    try:
        yield handle
    finally:
        handle.remove()
