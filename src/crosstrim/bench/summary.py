"""From samples to rows: medians, spreads, trimmed/full ratios, and the full-depth composition of
measured layer times."""

from __future__ import annotations

import itertools
import statistics

from crosstrim.engine import memory


def spread(values: list[float]) -> float:
    """(max - min) / median, as a fraction."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def at_depth(layer_s: list[float], total: float, mm: memory.MemoryModel, ref: memory.MemoryModel) -> float:
    """``total`` with the bench's decoder layers swapped for ``ref``'s full depth, from measured layer times:
    every self layer costs the median bench self layer, the first cross layer what it cost here, every
    later cross layer the median later cross layer. Embedding, head and mask preparation stay as measured."""
    cross = mm.cross_layers
    self_s = [t for i, t in enumerate(layer_s) if i not in cross]
    self_t = statistics.median(self_s) if self_s else 0.0
    later = statistics.median(layer_s[i] for i in cross[1:])
    return total - sum(layer_s) + ref.n_self * self_t + layer_s[cross[0]] + (ref.n_cross - 1) * later


def summarise(
    samples: list[dict], mm: memory.MemoryModel, ref: memory.MemoryModel | None, args, vision_s: float | None = None
) -> list[dict]:
    """One row per (text, batch, variant): medians, spreads and, for trimmed variants, ratios to full.

    With ``ref`` (a preset), also the full-depth composition; with ``vision_s`` (the composed seconds of the
    vision encoder + projector per image), time to first token end to end at full depth."""
    med, rows, dtype, first = statistics.median, [], args.kv_dtype, args.trim_first_layer_cache
    for text, batch in itertools.product(args.text_values, args.batch_values):
        for name, config in args.variants:
            runs = [s for s in samples if (s["text"], s["batch"], s["variant"]) == (text, batch, name)]

            def every(key: str, runs=runs) -> list:  # a value per run, or every decode step of every run
                return [v for s in runs for v in (s[key] if isinstance(s[key], list) else [s[key]])]

            row = {"text": text, "batch": batch, "variant": name, "runs": len(runs)}
            for key in ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s", "peak_bytes"):
                row[key] = med(every(key))
            row.update(prefill_spread=spread(every("prefill_s")), decode_spread=spread(every("decode_s")))
            row["decode_tok_s"] = batch / row["decode_s"]
            other = sum(every("prefill_other_cpu_s") + every("decode_other_cpu_s"))
            row["other_cpu_share"] = other / sum(every("prefill_s") + every("decode_s"))  # per second we ran
            row.update(kv_self_bytes=runs[0]["kv_self_bytes"], kv_cross_bytes=runs[0]["kv_cross_bytes"])
            shape = dict(batch=batch, r=1.0 if config is None else config.keep_ratio, trim_first_layer_cache=first)
            kv = mm.kv_bytes(dtype, text_tokens=text, **shape)
            row["kv_matches_model"] = all(memory.KVBytes(s["kv_self_bytes"], s["kv_cross_bytes"]) == kv for s in runs)
            if ref is not None:
                row["prefill_full_depth_s"] = med(at_depth(s["layer_prefill_s"], s["prefill_s"], mm, ref) for s in runs)
                row["decode_full_depth_s"] = med(
                    at_depth(s["layer_decode_s"], med(s["decode_s"]), mm, ref) for s in runs
                )
                if vision_s is not None:
                    row["ttft_full_depth_s"] = batch * vision_s + row["prefill_full_depth_s"]
            rows.append(row)
            if config is None:
                full, row["kept_fraction"] = row, 1.0
                continue
            at = text + (args.decode_steps + 1) // 2  # mean decode position
            row["kept_fraction"] = statistics.mean(k / v for k, v in zip(runs[0]["kept"], runs[0]["valid"]))
            for key in ("prefill", "decode", "decode_cpu"):
                row[f"{key}_ratio"] = row[f"{key}_s"] / full[f"{key}_s"]
            row["decode_ratio_predicted"] = mm.decode_ratio(dtype, text_tokens=at, **shape)
            row.update(hook_prefill_s=med(every("hook_prefill_s")), hook_decode_s=med(every("hook_decode_s")))
            row["scoring_share"] = row["hook_prefill_s"] / row["prefill_s"]
            if ref is not None:
                for key in ("prefill", "decode", "ttft"):
                    if f"{key}_full_depth_s" in row:
                        row[f"{key}_ratio_full_depth"] = row[f"{key}_full_depth_s"] / full[f"{key}_full_depth_s"]
                row["scoring_share_full_depth"] = row["hook_prefill_s"] / row["prefill_full_depth_s"]
                row["decode_ratio_predicted_full_depth"] = ref.decode_ratio(dtype, text_tokens=at, **shape)
    return rows
