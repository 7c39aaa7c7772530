"""The README's testbed example runs as written and prints the answers its comments promise."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_testbed_example_answers_sensibly():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (example,) = [b for b in blocks if "testbed.load(" in b]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, str(README), "exec"), {})
    answer, summary = printed.getvalue().splitlines()
    assert answer == "square"  # what the comment beside the print says, and the right answer
    assert summary.startswith("trimmed k=0.25: kept 47.1% of image tokens (per sample 16/34)")
    assert "<|unk|>" not in example
