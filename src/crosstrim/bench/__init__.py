"""The benchmark core behind ``crosstrim bench``, one job per module, read in this order:

* :mod:`~crosstrim.bench.measure`: the random model and its inputs, clocks, peak memory, per-layer timers,
  and one measurement (prefill every variant, then decode them step by step, interleaved);
* :mod:`~crosstrim.bench.summary`: samples to rows (medians, spreads, ratios) and the full-depth composition
  of measured layer times;
* :mod:`~crosstrim.bench.vision`: the vision encoder at real dimensions, composed from measured layers;
* :mod:`~crosstrim.bench.capacity`: the largest batch within a memory budget, predicted and measured, the
  throughput there, and its full-depth composition.

The command itself (options, the run, tables, plots) is :mod:`crosstrim.tools.bench`.
"""
