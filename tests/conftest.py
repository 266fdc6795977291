"""Shared test setup: offline, deterministic, small thread counts (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Triton fixes interpreted-or-compiled when a kernel is decorated, so l2a_kernels takes the mode
# once, when first imported (l2a_kernels.INTERPRETED); without CUDA the only working mode is the
# interpreter, so choose it before any test module imports triton or l2a_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton's own library (tl.zeros, ...) takes the mode of triton's first import: make that here,
# whatever a test later does to the variable.
import triton.language  # noqa: E402,F401


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread (and do not suffer from a busy second core):
    `pytestmark = pytest.mark.usefixtures("single_thread")` in a test module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
