import os

import pytest
import torch

# Tiny models: one intra-op thread is faster than two (and subprocess tests get the other core).
torch.set_num_threads(int(os.environ.get("MOE_SFT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
