import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny-model tests run on one thread: faster than two contending ones here, and deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
