"""The evaluation library the tools, the testbed and the integrations share.

Loading a local checkpoint and images (:mod:`~crosstrim.evaluation.checkpoint`), the unit of
evaluation (:class:`~crosstrim.evaluation.dataset.Item`), batched greedy answering full or trimmed
(:mod:`~crosstrim.evaluation.inference`) and its multi-process form
(:mod:`~crosstrim.evaluation.distributed`), dataset files and their scorers
(:mod:`~crosstrim.evaluation.sources`; VLMEvalKit TSVs in :mod:`~crosstrim.evaluation.vlmeval_tsv`,
their official metrics in :mod:`~crosstrim.evaluation.vlmeval_metrics`), and the settings a sweep
compares (:mod:`~crosstrim.evaluation.sweep`). Command-line options live with the CLI
(:mod:`crosstrim.cli.options`); this library takes typed values.

It builds on the method and its integration (:mod:`crosstrim.engine`) and imports nothing above
it: :mod:`crosstrim.testbed`, :mod:`crosstrim.integrations` and :mod:`crosstrim.tools` import it.
"""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""


def versions() -> dict[str, str]:
    """The library versions and platform a result was produced with, recorded in every results file."""
    import platform

    import torch
    import transformers

    import crosstrim

    return {
        "crosstrim": crosstrim.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_setup(
    model, model_name: str, data_name: str, items: int, batch_size: int, max_new_tokens: int, processes: int
) -> dict:
    """How a run answered its items, recorded in its results file: the model and data, the batch and
    decoding settings (greedy), the device, dtype and process count."""
    return {
        "model": model_name,
        "data": data_name,
        "items": items,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "decoding": "greedy",
        "processes": processes,
    }
