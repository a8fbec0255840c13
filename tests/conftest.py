import os

# Tiny models on 2 shared cores: intra-op threads only add contention (measured 7x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from robench.data import load_dataset

    return load_dataset("digits")
