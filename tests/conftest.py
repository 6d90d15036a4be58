import os
import sys

import pytest
import torch

# helpers.py and sharded_fit.py, for the test modules in every area folder below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The suite runs with `pytest -n 2` on 2 cores: one torch thread per worker avoids oversubscription,
# which makes the tiny models here 10x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cnn():
    """A small CNN in eval mode, seeded (the attribution tests' model)."""
    from helpers import small_cnn

    torch.manual_seed(0)
    return small_cnn().eval()


@pytest.fixture
def nondeterministic():
    """Deterministic algorithms off (a Trainer(deterministic=True) of an earlier test leaves them on)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before)
