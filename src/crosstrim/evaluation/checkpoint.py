"""Load a local Llama-3.2-Vision (Mllama) checkpoint directory and images, with errors that say what to fix."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from crosstrim.engine import memory
from crosstrim.evaluation import UserError

# Every spelling the commands accept for --dtype (case-insensitive), besides "auto": the dtypes a model
# loads in, spelled as the one dtype table spells them.
DTYPES = {name: memory.DTYPES[name] for name in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU; any spelling in :data:`DTYPES` is accepted."""
    if name.lower() == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name.lower() not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name.lower()]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable device is a user error, not a CUDA trace."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def load(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, processor)`` from a ``save_pretrained`` directory (model + processor files).

    ``dtype``: ``"auto"`` (bfloat16 on GPU, float32 on CPU) or a name in :data:`DTYPES` (``"bf16"``, ...).
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {str(path)!r} does not exist; pass a local checkpoint folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{str(path)!r} has no config.json; is it a transformers save_pretrained folder?")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {config_file}: {err}") from err
    if model_type != "mllama":
        raise UserError(
            f"{str(path)!r} holds a {model_type!r} model; crosstrim needs a Llama-3.2-Vision (mllama) checkpoint"
        )
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the processor from {str(path)!r} (save it beside the model): {err}") from err
    try:
        with _no_progress_bar():  # the tools report their own progress; keep stderr for errors
            model = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model weights from {str(path)!r}: {err}") from err
    return model.to(torch_device).eval(), processor


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers' loading bars off while loading, and back as the caller had them after: no global side effect."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_image(path: str | Path):
    """Open an image file as RGB; a missing or undecodable file is a user error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image {str(path)!r} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {str(path)!r}: not a decodable image file") from err


def format_prompt(processor, prompt: str, n_images: int) -> str:
    """Turn a user prompt into model text with one ``<|image|>`` per image.

    Processors with a chat template (Instruct checkpoints) get a user turn with the images first;
    plain ones get ``<|image|>`` tokens prepended unless the prompt already places them.
    """
    placed = prompt.count("<|image|>")
    if placed and placed != n_images:
        raise UserError(f"the prompt has {placed} <|image|> tokens but {n_images} images were given")
    if getattr(processor, "chat_template", None) and not placed:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt if placed else "<|image|>" * n_images + " " + prompt
