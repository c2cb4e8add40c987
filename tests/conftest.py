"""Shared test set-up: offline Hugging Face, deterministic torch, few threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# helper modules the tests import (fixtures and builders): their asserts are rewritten too
pytest.register_assert_rewrite("tiny_attribution", "random_dictionaries")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def one_thread():
    """One intra-op thread, for tests of tiny matrices (extra threads only spin on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
