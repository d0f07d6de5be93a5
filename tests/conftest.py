"""Fixtures shared by the whole suite."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one intra-op thread: the tensors are tiny, and on a busy 2-core machine a second
    spinning thread makes these tests many times slower. Restored after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
