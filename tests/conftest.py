import pytest
import torch

from crosstrim import tiny


@pytest.fixture(scope="session")
def tiny_model():
    """A random tiny Mllama (3 cross layers, GQA 4/2 heads, 4 tiles of 17 tokens), gates open."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny.random_model(seed=0)


@pytest.fixture
def model(tiny_model):
    return tiny_model[0]


@pytest.fixture
def processor(tiny_model):
    return tiny_model[1]
