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


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, digits):
    """A workdir with a briefly trained tiny standard model and a tiny pgdat model on digits."""
    from robench.train import TrainConfig, train

    workdir = tmp_path_factory.mktemp("workdir")
    for defense, steps in (("standard", 150), ("pgdat", 150)):
        cfg = TrainConfig(defense, "digits", arch="tiny-cnn", steps=steps, attack_steps=3)
        train(cfg, workdir, splits=digits, progress=False, checkpoint_every=steps, log_every=50)
    return workdir
