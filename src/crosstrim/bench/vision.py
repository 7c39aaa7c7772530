"""The vision encoder at real dimensions, timed layer by layer and composed to its full depth.

A user's time to first token is vision encoder + projector + decoder prefill; trimming shortens only the
last. The bench's random models carry a tiny encoder (the real one, 32 local + 8 global layers of width 1280
on ``max_tiles`` x 1601 tokens per image, takes minutes per image on one CPU thread), so its cost is measured
here apart: the preset's encoder built with one local and one global layer (random weights, real widths,
heads and tile geometry) runs on one image; per-layer timers give each layer's time, the rest (patch and
position embeddings, norms) is the total minus the layers, and the projector (``vision_output_dim`` to the
text width) is timed on an input of its real size. Full depth is composed from those parts:
``rest + local_layers x local + global_layers x global + projector`` per image, times the batch (the encoder
runs image by image in compute-bound kernels, so its time grows linearly with the batch: an assumption, said
where the figure is printed).

Its memory is composed the same way: the measured peak of the two-layer encoder above its weights and input
(one layer's attention and activations), plus the hidden states transformers keeps for the intermediate
features (every local and global layer's output, alive until the encoder returns), plus the wider output.
"""

from __future__ import annotations

import statistics

import torch

from crosstrim.bench.measure import Clock, peak, reset_peak


def time_vision(config, device: torch.device, dtype: torch.dtype, repeats: int, clock: Clock) -> dict:
    """Seconds per image of the vision encoder and projector of ``config`` (an ``MllamaConfig``, e.g.
    :func:`crosstrim.engine.memory.preset_config`) at its full depth, composed from one local and one global layer
    measured here; and its composed peak memory above its weights and input, in bytes."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    vision, text_hidden = config.vision_config, config.text_config.hidden_size
    small = vision.to_dict() | {"num_hidden_layers": 1, "num_global_layers": 1, "intermediate_layers_indices": [0]}
    small["vision_output_dim"] = 2 * vision.hidden_size
    torch.manual_seed(0)
    with torch.device(device):
        encoder = MllamaVisionModel._from_config(MllamaVisionConfig(**small), dtype=dtype).eval()
        projector = torch.nn.Linear(vision.vision_output_dim, text_hidden, dtype=dtype)
    tiles, size = vision.max_num_tiles, vision.image_size
    ratio_id = 1 + next(i for i, (h, w) in enumerate(vision.supported_aspect_ratios) if h * w == tiles)
    inputs = {
        "pixel_values": torch.randn(1, 1, tiles, 3, size, size, dtype=dtype, device=device),
        "aspect_ratio_ids": torch.full((1, 1), ratio_id, device=device),
        "aspect_ratio_mask": torch.ones(1, 1, tiles, dtype=torch.long, device=device),
    }
    tokens = tiles * encoder.num_patches
    features = torch.randn(tokens, vision.vision_output_dim, dtype=dtype, device=device)

    spans: dict[str, list] = {}
    handles = []
    for key, layer in (("local", encoder.transformer.layers[0]), ("global", encoder.global_transformer.layers[0])):
        handles.append(layer.register_forward_pre_hook(lambda *_, k=key: spans.setdefault(k, []).append(clock.mark())))
        handles.append(layer.register_forward_hook(lambda *_, k=key: spans[k].append(clock.mark())))
    runs = []
    try:
        with torch.inference_mode():
            for rep in range(repeats + 1):  # the first run warms up, untimed
                spans.clear()
                held = reset_peak(device)
                start = clock.now()
                encoder(**inputs)
                total = clock.now() - start
                transient = peak(device) - held
                start = clock.now()
                projector(features)
                project = clock.now() - start
                local, glob = (clock.seconds(*spans[k]) for k in ("local", "global"))
                if rep:
                    runs.append({"total": total, "local": local, "global": glob, "projector": project})
                    runs[-1]["peak"] = transient
    finally:
        for h in handles:
            h.remove()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rest = med["total"] - med["local"] - med["global"]
    depth = (vision.num_hidden_layers, vision.num_global_layers)
    per_image = rest + depth[0] * med["local"] + depth[1] * med["global"] + med["projector"]
    padded = tiles * (encoder.num_patches + (8 - encoder.num_patches % 8) % 8)  # transformers pads to 8
    state = padded * vision.hidden_size * dtype.itemsize
    wider_output = tokens * (vision.vision_output_dim - small["vision_output_dim"]) * dtype.itemsize
    transient = med["peak"] + (sum(depth) - 2) * state + wider_output
    return {
        "layers": {"local": depth[0], "global": depth[1]},
        "hidden": vision.hidden_size,
        "tokens_per_image": tokens,
        "measured_s": {k: med[k] for k in ("local", "global", "projector")} | {"rest": rest},
        "seconds_per_image": per_image,
        "measured_peak_bytes": int(med["peak"]),
        "transient_bytes": int(transient),
    }
