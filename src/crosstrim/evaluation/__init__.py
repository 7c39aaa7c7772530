"""The evaluation library the tools, the testbed and the integrations share.

Loading a local checkpoint and images (:mod:`~crosstrim.evaluation.checkpoint`), the unit of
evaluation (:class:`~crosstrim.evaluation.dataset.Item`), batched greedy answering full or trimmed
(:mod:`~crosstrim.evaluation.inference`) and its multi-process form
(:mod:`~crosstrim.evaluation.distributed`), dataset files and their scorers
(:mod:`~crosstrim.evaluation.sources`; VLMEvalKit TSVs in :mod:`~crosstrim.evaluation.vlmeval_tsv`,
their official metrics in :mod:`~crosstrim.evaluation.vlmeval_metrics`), and the command-line
options every tool spells the same way (:mod:`~crosstrim.evaluation.options`).

It builds on the method and its integration (:mod:`crosstrim.mllama`) and imports nothing above
it: :mod:`crosstrim.testbed`, :mod:`crosstrim.integrations` and :mod:`crosstrim.tools` import it.
"""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""
