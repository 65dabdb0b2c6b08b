import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEST_THREADS = 2  # every test starts with the same torch thread count (values depend on kernels)


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)
