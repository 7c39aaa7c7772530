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


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """The tiny random model and its offline processor, saved like a real checkpoint."""
    path = tmp_path_factory.mktemp("tiny-mllama")
    model, processor = tiny.random_model(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
