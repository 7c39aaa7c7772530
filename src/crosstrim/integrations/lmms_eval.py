"""lmms-eval model ``llama_vision_trimmed``: Llama-3.2-Vision with crosstrim, batched and greedy.

Installed with ``pip install "crosstrim[lmms]"``; crosstrim registers the model through lmms-eval's
entry-point group ``lmms_eval.models``, so no lmms-eval file is edited::

    lmms-eval --model llama_vision_trimmed \\
        --model_args pretrained=meta-llama/Llama-3.2-11B-Vision-Instruct,method=trimmed,k_ratio=0.25,batch_size=8 \\
        --tasks mme,pope --output_path results/ --log_samples

Model arguments (``--model_args key=value,...``):

* ``pretrained``: a local checkpoint folder or a Hub id;
* ``method``: ``trimmed`` (default), ``mean``, ``random``, ``uniform``, or ``full`` for the untrimmed
  model; ``k_ratio`` / ``keep_ratio`` / ``seed`` / ``trim_first_layer_cache`` /
  ``summarize_dropped`` as in :class:`crosstrim.TrimConfig`;
* ``batch_size`` (default 1; overrides ``--batch_size``), ``max_new_tokens`` (used when a task sets
  none; default 1024, as lmms-eval's ``llama_vision``);
* ``device`` (``auto``: ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``), ``dtype`` (``auto``:
  bfloat16 on GPU, float32 on CPU), ``device_map`` (e.g. ``auto``: one process spreads the model
  over every visible GPU, for 90B);
* ``stats_path``: also write one JSON line per request (kept tokens, KV bytes) to this file
  (``.rankN`` is added before the suffix when several processes run).

Answers are greedy and deterministic: a task's ``do_sample``/``temperature``/``num_beams`` are
ignored with a warning; ``until`` stop strings are applied. Requests are answered in batches by
:func:`crosstrim.evaluation.inference.predict`, the loop ``crosstrim eval`` uses. Every response carries
its trimming numbers in lmms-eval's per-sample ``token_counts`` (written with ``--log_samples``):
``crosstrim_kept``, ``crosstrim_valid``, ``crosstrim_kept_fraction``, ``crosstrim_kv_bytes_full``,
``crosstrim_kv_bytes_kept``. Under lmms-eval's multi-process launch (``accelerate launch
--num_processes N -m lmms_eval ...`` or ``torchrun``), every process answers its shard of the
documents on ``cuda:LOCAL_RANK`` (or the CPU) and lmms-eval gathers the results.

Local lmms-eval tasks made from crosstrim items are written by :mod:`crosstrim.integrations.lmms_eval_tasks`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

from crosstrim.core import TrimConfig, method_names
from crosstrim.evaluation import checkpoint, distributed
from crosstrim.evaluation.dataset import Item
from crosstrim.evaluation.inference import Prediction, predict
from crosstrim.integrations import LMMS_EVAL_MODEL

UNTRIMMED = ("full", "none")
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class TrimCounts(TokenCounts):
    """lmms-eval's per-request counters plus what trimming kept, so they land in the logged samples."""

    crosstrim_method: str | None = None
    crosstrim_kept: int | None = None
    crosstrim_valid: int | None = None
    crosstrim_kv_bytes_full: int | None = None
    crosstrim_kv_bytes_kept: int | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = dict(super().to_dict())
        record["crosstrim_method"] = self.crosstrim_method
        if self.crosstrim_kept is not None:
            record["crosstrim_kept"] = self.crosstrim_kept
            record["crosstrim_valid"] = self.crosstrim_valid
            record["crosstrim_kept_fraction"] = (
                self.crosstrim_kept / self.crosstrim_valid if self.crosstrim_valid else 1.0
            )
            record["crosstrim_kv_bytes_full"] = self.crosstrim_kv_bytes_full
            record["crosstrim_kv_bytes_kept"] = self.crosstrim_kv_bytes_kept
        return record


def trim_config(
    method: str = "trimmed",
    k_ratio: float | str | None = None,
    keep_ratio: float | str | None = None,
    seed: int | str = 0,
    trim_first_layer_cache: bool | str = False,
    summarize_dropped: bool | str = False,
) -> TrimConfig | None:
    """The :class:`TrimConfig` model arguments describe (``None`` for ``method=full``).

    Values are strings (``"False"``, ``"0.25"``) or typed, as lmms-eval or a Python caller passes them;
    :meth:`TrimConfig.from_options` parses them strictly (``"False"`` is False, ``"maybe"`` an error).
    """
    if method in UNTRIMMED:
        if k_ratio is not None or keep_ratio is not None:
            raise ValueError(f"method={method} runs the untrimmed model; drop k_ratio/keep_ratio")
        return None
    if method not in method_names():  # this adapter's method also takes "full", which TrimConfig does not
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join((*method_names(), 'full'))}")
    options = {
        "method": method,
        "k_ratio": k_ratio,
        "keep_ratio": keep_ratio,
        "seed": seed,
        "trim_first_layer_cache": trim_first_layer_cache,
        "summarize_dropped": summarize_dropped,
    }
    return TrimConfig.from_options(options)


def _flatten(visuals: Any) -> Iterable[Any]:
    if isinstance(visuals, (list, tuple)):
        for visual in visuals:
            yield from _flatten(visual)
    elif visuals is not None:
        yield visuals


def _images(visuals: Any, where: str) -> tuple[Image.Image, ...]:
    images = []
    for visual in _flatten(visuals):
        if not isinstance(visual, Image.Image):
            raise ValueError(
                f"{where}: {LMMS_EVAL_MODEL} answers about images; got a {type(visual).__name__} visual "
                "(videos and audio are not supported)"
            )
        images.append(visual if visual.mode == "RGB" else visual.convert("RGB"))
    if not images:
        raise ValueError(f"{where}: the request has no image; crosstrim trims image features, use an image task")
    return tuple(images)


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class LlamaVisionTrimmed(lmms):
    """Llama-3.2-Vision (Mllama) with crosstrim trimming, for lmms-eval ``generate_until`` tasks."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "trimmed",
        k_ratio: float | str | None = None,
        keep_ratio: float | str | None = None,
        seed: int | str = 0,
        trim_first_layer_cache: bool | str = False,
        summarize_dropped: bool | str = False,
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str = "auto",
        dtype: str = "auto",
        device_map: str | None = None,
        stats_path: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches have a fixed size here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"{LMMS_EVAL_MODEL} got unknown model_args {', '.join(sorted(unknown))}; it takes pretrained, "
                "method, k_ratio, keep_ratio, seed, trim_first_layer_cache, summarize_dropped, batch_size, "
                "max_new_tokens, device, dtype, device_map, stats_path"
            )
        self.config = trim_config(method, k_ratio, keep_ratio, seed, trim_first_layer_cache, summarize_dropped)
        if not str(batch_size).isdigit():
            raise ValueError(f"batch_size must be a whole number (no automatic batch size), got {batch_size!r}")
        self.batch_size_per_process = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_process < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")
        self._rank, self._world_size, local_rank = distributed.from_environment()
        if device_map and self._world_size > 1:
            raise ValueError("device_map spreads one model over the GPUs; launch one process, not several")
        self._model, self.processor = self._load(str(pretrained), device, dtype, device_map, local_rank)
        self._device = next(self._model.parameters()).device if device_map else self._model.device
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.stats_path = self._stats_file(stats_path)
        self._warned: set[str] = set()

    @staticmethod
    def _load(pretrained: str, device: str, dtype: str, device_map: str | None, local_rank: int):
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        elif device == "auto":
            device = "cpu"
        if Path(pretrained).is_dir() and not device_map:
            return checkpoint.load(pretrained, device, dtype)  # clear errors for a local folder
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        # With a device map the weights go to GPUs: "auto" means bfloat16 there, as on one GPU.
        kwargs: dict[str, Any] = {
            "dtype": checkpoint.resolve_dtype(dtype, torch.device("cuda" if device_map else device))
        }
        if device_map:
            kwargs["device_map"] = device_map
        model = MllamaForConditionalGeneration.from_pretrained(pretrained, **kwargs)
        if not device_map:
            model = model.to(device)
        return model.eval(), AutoProcessor.from_pretrained(pretrained)

    def _stats_file(self, stats_path: str | None) -> Path | None:
        if not stats_path:
            return None
        path = Path(stats_path)
        if self._world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return path

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that ``--model_args`` win over the CLI's ``--batch_size``/``--device``."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- lmms-eval interface -------------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{LMMS_EVAL_MODEL} answers generate_until tasks only (no loglikelihood)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{LMMS_EVAL_MODEL} answers single-round generate_until tasks only")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        items, lengths, stops = [], [], []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            where = f"{task}/{split}/{doc_id}"
            images = _images(doc_to_visual(self.task_dict[task][split][doc_id]), where)
            items.append(Item(id=where, images=images, prompt=context, answer="", category=task))
            gen_kwargs = dict(gen_kwargs or {})
            self._warn_sampling(gen_kwargs)
            lengths.append(int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens))
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
        predictions: list[Prediction | None] = [None] * len(items)
        start = time.perf_counter()
        bar = _progress(len(items), disable=self.rank != 0)
        for length in dict.fromkeys(lengths):  # one predict call per max_new_tokens, order kept
            rows = [r for r, n in enumerate(lengths) if n == length]
            answers = predict(
                self.model,
                self.processor,
                [items[r] for r in rows],
                self.config,
                batch_size=self.batch_size_per_process,
                max_new_tokens=length,
                progress=bar.update,
            )
            for row, answer in zip(rows, answers):
                predictions[row] = answer
        bar.close()
        done = [p for p in predictions if p is not None]
        results = [self._result(p, stop) for p, stop in zip(done, stops)]
        self._log(requests, done, time.perf_counter() - start)
        return results

    # -- helpers ---------------------------------------------------------------------------------

    def _warn_sampling(self, gen_kwargs: dict) -> None:
        asked = [
            key
            for key, off in (("do_sample", False), ("temperature", 0), ("num_beams", 1))
            if gen_kwargs.get(key) not in (None, off, 0.0)
        ]
        for key in asked:
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"{LMMS_EVAL_MODEL} decodes greedily; ignoring the task's {key}={gen_kwargs[key]!r}",
                    stacklevel=3,
                )

    def _result(self, prediction: Prediction, until: Sequence[str]) -> GenerationResult:
        counts = TrimCounts(
            crosstrim_method=self.config.describe() if self.config is not None else "full",
            crosstrim_kept=prediction.kept,
            crosstrim_valid=prediction.valid,
            crosstrim_kv_bytes_full=prediction.kv_bytes_full,
            crosstrim_kv_bytes_kept=prediction.kv_bytes_kept,
        )
        return GenerationResult(text=_cut(prediction.text, until), token_counts=counts)

    def _log(self, requests: Sequence[Instance], predictions: Sequence[Prediction], seconds: float) -> None:
        """Per-request numbers to ``stats_path``; a one-line summary of this process's shard to the log."""
        real = [(r, p) for r, p in zip(requests, predictions) if not (r.metadata or {}).get("__padding_only__")]
        if self.stats_path is not None:
            with self.stats_path.open("a", encoding="utf-8") as handle:
                for request, p in real:
                    _, _, _, doc_id, task, split = request.args
                    record = {"task": task, "split": split, "doc_id": doc_id, "rank": self.rank}
                    record |= {k: v for k, v in _record(p).items() if k != "id"}
                    handle.write(json.dumps(record) + "\n")
        fractions = [p.kept_fraction for _, p in real if p.kept_fraction is not None]
        if fractions:
            from loguru import logger

            kept = sum(p.kv_bytes_kept or 0 for _, p in real) / max(1, sum(p.kv_bytes_full or 0 for _, p in real))
            logger.info(
                f"{LMMS_EVAL_MODEL} rank {self.rank}: {len(real)} requests in {seconds:.1f}s, "
                f"{self.config.describe() if self.config else 'full'} kept {sum(fractions) / len(fractions):.1%} "
                f"of image tokens, cross-attention KV {kept:.1%} of full"
            )


def _record(prediction: Prediction) -> dict[str, Any]:
    return {
        "id": prediction.id,
        "kept": prediction.kept,
        "valid": prediction.valid,
        "kept_fraction": prediction.kept_fraction,
        "kv_bytes_full": prediction.kv_bytes_full,
        "kv_bytes_kept": prediction.kv_bytes_kept,
    }


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc="Model Responding")


__all__ = ["LlamaVisionTrimmed", "TrimCounts", "trim_config"]
