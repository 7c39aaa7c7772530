"""Llama-3.2-Vision (``MllamaForConditionalGeneration`` checkpoints) as a vLLM V1 encoder-decoder model.

vLLM treats the image as the encoder input of an encoder-decoder model, as it does Whisper's audio: the
multimodal processor gives each image a number of cross-attention KV slots, the scheduler allocates
them before prefill, the model runs the vision tower in :meth:`embed_multimodal` and, at the request's
prefill, writes K/V for exactly that many tokens into every cross-attention layer's paged cache. Decode
steps read the cache. The slot count is the image's valid tokens (padding tiles take none), or with
crosstrim's ``keep_ratio`` its budget: the first cross layer scores every token with
:mod:`crosstrim.core` and every cross layer caches only the kept ones.

What transformers computes, and how it is reproduced here:

* rows from ``<|image|>`` on attend the image's valid tiles: the paged cache holds exactly those (or the
  kept ones);
* rows before ``<|image|>`` get an all-zero additive mask, so they attend *every* token, padding tiles
  included, and their attention output reaches the residual (only their MLP output is zeroed). vLLM
  schedules an encoder-decoder prompt whole (it turns chunked prefill off for them), so these rows are
  always in the step that has the full encoder output, and are computed from it densely;
* text-only requests skip the cross-attention layers (transformers skips them without image states).

Trimmed, the first cross layer at prefill also attends densely over every token (as the transformers
path scores before it trims); later layers' projections see only the kept features, as crosstrim's
gathered features give them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature, MllamaConfig, MllamaProcessor
from transformers.models.mllama.modeling_mllama import MllamaVisionModel
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.forward_context import get_forward_context
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

from crosstrim.adapters.mllama import tokens_per_tile
from crosstrim.core import TrimConfig
from crosstrim.integrations.vllm import selection, settings

IMAGE_FIELDS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
RECENT_SELECTIONS = 256

# -- multimodal processor -------------------------------------------------------------------------------


class MllamaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MllamaConfig:
        return self.ctx.get_hf_config(MllamaConfig)

    def get_hf_processor(self, **kwargs: object) -> MllamaProcessor:
        return self.ctx.get_hf_processor(MllamaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # One image per prompt: vLLM refuses more at request time ("At most 1 image(s) ...").
        return {"image": 1}

    def trim_config(self) -> TrimConfig | None:
        return settings.trim_config(self.get_hf_config())

    def slots(self, tiles: int) -> int:
        vision = self.get_hf_config().vision_config
        return settings.image_slots(tiles, tokens_per_tile(vision.image_size, vision.patch_size), self.trim_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.slots(self.get_hf_config().vision_config.max_num_tiles)}


class MllamaDummyInputsBuilder(BaseDummyInputsBuilder[MllamaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, BaseDummyOptions]
    ) -> MultiModalDataDict:
        vision = self.info.get_hf_config().vision_config
        # A 1 x max_tiles strip: the most tiles, so the most slots an image can take.
        return {
            "image": self._get_dummy_images(
                width=vision.image_size,
                height=vision.image_size * vision.max_num_tiles,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class MllamaMultiModalProcessor(EncDecMultiModalProcessor[MllamaProcessingInfo]):
    """Runs transformers' ``MllamaProcessor`` on the image; the decoder prompt is the prompt as given.

    The encoder prompt is one ``<|image|>`` per image, replaced by as many placeholders as the image gets
    cross-attention slots: that count is what vLLM allocates.
    """

    # Mllama's decoder prompt is the prompt itself (transformers' processor places <|begin_of_text|>):
    # vLLM must not prepend a decoder start token as it does for Whisper or BART.
    skip_decoder_start_token = True

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        out = super()._call_hf_processor(hf_data, hf_kwargs)
        # transformers batches (prompts, images, ...); vLLM's fields are batched by image.
        return BatchFeature({name: out[name].flatten(0, 1) for name in IMAGE_FIELDS})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {name: MultiModalFieldConfig.batched("image") for name in IMAGE_FIELDS}

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        token = self.info.get_hf_config().image_token_index
        images = mm_items.get_all_counts().get("image", 0)
        if prompt.count(token) != images:
            raise ValueError(
                f"the prompt has {prompt.count(token)} <|image|> tokens for {images} image(s); put one <|image|> "
                "where the image belongs (the chat template does this for image content)"
            )
        return [token] * images

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        token = self.info.get_hf_config().image_token_index

        def replacement(item: int) -> list[int]:
            tiles = int(out_mm_kwargs["image"][item].get_data()["aspect_ratio_mask"].sum())
            return [token] * self.info.slots(tiles)

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]


# -- text decoder ---------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """transformers' ``MllamaTextRMSNorm`` (float32 statistics, weight applied in the input dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass
class _ImagePrefill:
    """One request whose prefill runs in this step, with its image's full encoder output."""

    rows: slice  # its text rows in the flat batch
    image_row: int  # index of its <|image|> token among them: earlier rows attend every image token
    states: torch.Tensor  # (N, hidden), N = max_tiles * tokens_per_tile, padding tiles included
    valid: torch.Tensor  # (N,) bool, tokens of real tiles
    prompt_ids: list[int]
    cached: torch.Tensor | None = None  # (slots,) token indices every cross layer caches


@dataclass
class _Step:
    """What the cross layers of one forward need to know about the flat batch."""

    active: torch.Tensor  # (T, 1) bool: rows of requests with an image (the others skip cross layers)
    before_image: torch.Tensor  # (T, 1) bool: rows before <|image|> (their MLP output is zeroed)
    prefills: list[_ImagePrefill] = field(default_factory=list)


class MllamaCrossAttention(nn.Module):
    def __init__(self, text_config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
        if heads % tp or kv_heads % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide the {heads} attention and {kv_heads} KV heads of "
                "Mllama's cross-attention"
            )
        self.head_dim = text_config.hidden_size // heads
        self.heads, self.kv_heads = heads // tp, kv_heads // tp
        self.scaling = self.head_dim**-0.5
        hidden, quant = text_config.hidden_size, vllm_config.quant_config
        self.q_proj = ColumnParallelLinear(
            hidden, heads * self.head_dim, bias=False, quant_config=quant, prefix=f"{prefix}.q_proj"
        )
        self.k_proj = ColumnParallelLinear(
            hidden, kv_heads * self.head_dim, bias=False, quant_config=quant, prefix=f"{prefix}.k_proj"
        )
        self.v_proj = ColumnParallelLinear(
            hidden, kv_heads * self.head_dim, bias=False, quant_config=quant, prefix=f"{prefix}.v_proj"
        )
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, hidden, bias=False, quant_config=quant, prefix=f"{prefix}.o_proj"
        )
        self.q_norm = _RMSNorm(self.head_dim, text_config.rms_norm_eps)
        self.k_norm = _RMSNorm(self.head_dim, text_config.rms_norm_eps)
        self.attn = CrossAttention(
            self.heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=quant,
            prefix=f"{prefix}.attn",
        )

    def query(self, x: torch.Tensor) -> torch.Tensor:
        q, _ = self.q_proj(x)
        return self.q_norm(q.view(-1, self.heads, self.head_dim))

    def key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_heads, n, d)`` keys (after ``k_norm``) and values of image features ``(n, hidden)``."""
        k, _ = self.k_proj(states)
        v, _ = self.v_proj(states)
        k = self.k_norm(k.view(-1, self.kv_heads, self.head_dim))
        return k.transpose(0, 1), v.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of rows ``q (L, H, d)`` over all of ``k, v (G, N, d)`` under an additive mask ``(1, 1, L, N)``."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=self.scaling, enable_gqa=True
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def __init__(self, text_config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        eps = text_config.rms_norm_eps
        self.cross_attn = MllamaCrossAttention(text_config, vllm_config, f"{prefix}.cross_attn")
        self.input_layernorm = _RMSNorm(text_config.hidden_size, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            hidden_act=text_config.hidden_act,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.post_attention_layernorm = _RMSNorm(text_config.hidden_size, eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, step: _Step, trim: TrimConfig | None, first: bool) -> torch.Tensor:
        attn = self.cross_attn
        q = attn.query(self.input_layernorm(hidden))
        cached_k, cached_v, dense_rows = [], [], []
        for p in step.prefills:
            if trim is not None and not first:
                # Later layers project only the kept features (crosstrim's gathered features).
                k, v = attn.key_value(p.states[p.cached])
                cached_k.append(k)
                cached_v.append(v)
                continue  # rows before <|image|> attend the kept tokens uniformly: the cache gives exactly that
            k, v = attn.key_value(p.states)
            if first and trim is not None:
                p.cached = self._select(q[p.rows], k, p, trim)
            cached_k.append(k[:, p.cached])
            cached_v.append(v[:, p.cached])
            # Rows that attend more than the cache holds, computed densely from every token: untrimmed, the
            # rows before <|image|>; trimmed, this first layer's every row (transformers trims after it).
            length = p.image_row if trim is None else p.rows.stop - p.rows.start
            if length:
                rows = slice(p.rows.start, p.rows.start + length)
                after = torch.arange(length, device=q.device) >= p.image_row
                mask = selection.cross_mask(p.valid, after, q.dtype)
                dense_rows.append((rows, attn.dense(q[rows], k, v, mask)))
        if cached_k:
            # The layer writes these into the request's cross-attention slots (vLLM's slot mapping follows
            # the requests in batch order, as the prefills are listed), then attends the cache.
            k = torch.cat(cached_k, dim=1).transpose(0, 1).reshape(-1, attn.kv_heads * attn.head_dim)
            v = torch.cat(cached_v, dim=1).transpose(0, 1).reshape(-1, attn.kv_heads * attn.head_dim)
            out = attn.attn(q.reshape(q.shape[0], -1), k, v)
        else:
            out = attn.attn(q.reshape(q.shape[0], -1), None, None)
        for rows, dense in dense_rows:
            out[rows] = dense
        out, _ = attn.o_proj(out)
        new = hidden + self.cross_attn_attn_gate.tanh() * out
        mlp = self.mlp(self.post_attention_layernorm(new)).masked_fill(step.before_image, 0.0)
        new = new + self.cross_attn_mlp_gate.tanh() * mlp
        return torch.where(step.active, new, hidden)

    def _select(self, q: torch.Tensor, k: torch.Tensor, p: _ImagePrefill, trim: TrimConfig) -> torch.Tensor:
        """The kept token indices of one image, from this (the first) cross layer's queries and keys."""
        scores = None
        if trim.needs_scores:
            after = torch.arange(q.shape[0], device=q.device) >= p.image_row
            scores = selection.scores(q, k, p.valid, after, self.cross_attn.scaling, trim.score_chunk_elements)
            if get_tensor_model_parallel_world_size() > 1:
                scores = tensor_model_parallel_all_gather(scores.contiguous(), dim=1)  # every head ranks tokens
        return selection.keep_indices(trim, scores, p.valid, p.prompt_ids).to(k.device)


class MllamaTextModel(nn.Module):
    def __init__(self, text_config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.cross_layers = sorted(int(i) for i in text_config.cross_attention_layers)
        # Mllama's embedding has 8 rows past the vocabulary (the <|image|> token is one of them in 11B/90B).
        self.embed_tokens = VocabParallelEmbedding(text_config.vocab_size + 8, text_config.hidden_size)
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(text_config, vllm_config, f"{prefix}.layers.{i}")
            if i in self.cross_layers
            else LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}", config=text_config)
            for i in range(text_config.num_hidden_layers)
        )
        self.norm = _RMSNorm(text_config.hidden_size, text_config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, step: _Step, trim: TrimConfig | None
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if i in self.cross_layers:
                hidden = layer(hidden, step, trim, first=i == self.cross_layers[0])
            else:
                out, residual = layer(positions, hidden, None)
                hidden = out + residual
        return self.norm(hidden)


class MllamaLanguageModel(nn.Module):
    def __init__(self, text_config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.model = MllamaTextModel(text_config, vllm_config, f"{prefix}.model")
        self.lm_head = ParallelLMHead(text_config.vocab_size, text_config.hidden_size, prefix=f"{prefix}.lm_head")


# -- the model ------------------------------------------------------------------------------------------

# Checkpoint names -> this model's: transformers >= 4.52 in memory (and checkpoints saved that way) put the
# towers under `model.`; the released checkpoints (and transformers 5's save) use the original layout.
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# Self-attention layers use vLLM's Llama layer, whose q/k/v and gate/up projections are fused.
_STACKED = (
    (".self_attn.qkv_proj", ".self_attn.q_proj", "q"),
    (".self_attn.qkv_proj", ".self_attn.k_proj", "k"),
    (".self_attn.qkv_proj", ".self_attn.v_proj", "v"),
    (".mlp.gate_up_proj", ".mlp.gate_proj", 0),
    (".mlp.gate_up_proj", ".mlp.up_proj", 1),
)


@MULTIMODAL_REGISTRY.register_processor(
    MllamaMultiModalProcessor, info=MllamaProcessingInfo, dummy_inputs=MllamaDummyInputsBuilder
)
class MllamaForConditionalGeneration(nn.Module, SupportsMultiModal):
    """Llama-3.2-Vision on vLLM V1, optionally trimmed (``hf_overrides={"crosstrim": {"keep_ratio": r}}``)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|image|>"
        raise ValueError("Llama-3.2-Vision takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        vision, text = config.vision_config, config.text_config
        self.trim = settings.trim_config(config)
        self.tokens_per_tile = tokens_per_tile(vision.image_size, vision.patch_size)
        self.max_tiles = vision.max_num_tiles
        settings.check_budget(self.tokens_per_tile, self.trim)
        self.image_token = config.image_token_index
        self.dtype = vllm_config.model_config.dtype
        # The vision tower is transformers' own module (replicated on every tensor-parallel rank).
        self.vision_model = MllamaVisionModel(vision)
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text.hidden_size, bias=True)
        self.language_model = MllamaLanguageModel(text, vllm_config, "language_model")
        self.logits_processor = LogitsProcessor(text.vocab_size)
        first = self.language_model.model.layers[self.language_model.model.cross_layers[0]]
        self._metadata_layer = first.cross_attn.attn.layer_name
        # Kept token indices of the last trimmed prefills, by prompt token ids: what crosstrim's
        # TrimStats.kept_indices reports on transformers, for inspection and tests (engine in-process).
        self.recent_selections: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()

    # -- vLLM's multimodal interface --

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Each image's features ``(max_tiles * tokens_per_tile, hidden)``, padding tiles included."""
        pixels = kwargs["pixel_values"]
        pixels = torch.stack(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
        ids = torch.as_tensor(kwargs["aspect_ratio_ids"]).reshape(-1, 1)
        tile_mask = torch.as_tensor(kwargs["aspect_ratio_mask"]).reshape(ids.shape[0], 1, -1)
        out = self.vision_model(
            pixel_values=pixels.to(self.dtype)[:, None], aspect_ratio_ids=ids, aspect_ratio_mask=tile_mask
        ).last_hidden_state
        features = self.multi_modal_projector(out)
        return list(features.reshape(ids.shape[0], -1, features.shape[-1]).unbind(0))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: object | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def get_language_model(self) -> nn.Module:
        return self.language_model

    # -- forward --

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        step = self._step(input_ids, positions, encoder_outputs or [])
        hidden = self.language_model.model(input_ids, positions, step, self.trim)
        if self.trim is not None:
            for p in step.prefills:
                self.recent_selections[tuple(p.prompt_ids)] = p.cached.tolist()
                while len(self.recent_selections) > RECENT_SELECTIONS:
                    self.recent_selections.popitem(last=False)
        return hidden

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_outputs: list[torch.Tensor]) -> _Step:
        """Which rows belong to requests with an image, which come before ``<|image|>``, and each image
        prefill's features, from the cross-attention metadata (request boundaries, encoder lengths)."""
        tokens = input_ids.shape[0]
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self._metadata_layer)
        active = torch.zeros(tokens, 1, dtype=torch.bool, device=input_ids.device)
        before = torch.zeros_like(active)
        if metadata is None:  # vLLM's warm-up and profiling runs: no requests, nothing is cached
            return _Step(active.fill_(True), before)
        starts = metadata.query_start_loc.tolist()
        slots = metadata.seq_lens.tolist()  # per request: its image's cross-attention slots (0: text only)
        pos = positions.tolist()
        step = _Step(active, before)
        images = iter(encoder_outputs)
        for r in range(len(starts) - 1):
            begin, end = starts[r], starts[r + 1]
            if slots[r] == 0 or end == begin:
                continue  # text-only request: transformers skips the cross layers
            active[begin:end] = True
            if pos[begin] != 0:
                continue  # a decode step: every row attends the cache
            ids = input_ids[begin:end].tolist()
            states = next(images, None)
            if states is None or self.image_token not in ids:
                raise RuntimeError(
                    "a request's prefill came without its image features or its <|image|> token: "
                    "crosstrim's vLLM Mllama needs whole prompts in one step (vLLM's default for "
                    "encoder-decoder models)"
                )
            image_row = ids.index(self.image_token)
            before[begin : begin + image_row] = True
            tiles = settings.valid_tiles(slots[r], self.max_tiles, self.tokens_per_tile, self.trim)
            valid = torch.arange(states.shape[0], device=states.device) < tiles * self.tokens_per_tile
            prefill = _ImagePrefill(slice(begin, end), image_row, states.to(self.dtype), valid, ids)
            if self.trim is None:
                prefill.cached = valid.nonzero().flatten()
            step.prefills.append(prefill)
        if next(images, None) is not None:
            raise RuntimeError("more image features than image prefills in this step")
        return step

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.language_model.lm_head, hidden_states)

    # -- weights --

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            for old, new in _RENAMES:
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            for fused, part, shard in _STACKED:
                if name.startswith("language_model.") and part in name:
                    target = name.replace(part, fused)
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint weight {name!r} has no place in Mllama's vLLM model")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded
