"""The README's example runs as printed: what its comments say it prints, it prints."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_example_prints_what_its_comment_says():
    (block,) = python_blocks(REPO / "README.md")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), {})
    comment = re.search(r"print\(.*\)\s+# (.*?):", block).group(1)
    assert printed.getvalue().strip() == comment
