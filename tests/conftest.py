"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Run the suite's small tensors on one intra-op thread, then restore the setting.

    With states of a few hundred numbers every op is dominated by thread start-up and
    hand-off: on a loaded 2-core machine two threads made such runs about ten times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
