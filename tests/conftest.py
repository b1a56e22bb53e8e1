"""Shared pytest setup: make `import train_gpt` and `import smoke_data` work from any cwd,
provide a session-wide synthetic data set (SentencePiece tokenizer + shards), and the
single-thread math-attention setting of the model tests."""
import os
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _p in (REPO_ROOT, TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a second or more (a subprocess run, a training run, a compile); "
                                       "the fast loop skips them with -m \"not slow\"")


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory):
    """(data_dir, tokenizer_path, vocab) of a small smoke_data set: 3 train shards + 1 val shard."""
    import smoke_data
    out = tmp_path_factory.mktemp("smoke")
    data_dir, tok = smoke_data.build(str(out), vocab=512, train_docs=600, val_docs=80, train_shards=3)
    return data_dir, tok, 512


@pytest.fixture(scope="module")
def one_thread_math():
    """Tiny matrices: OpenMP threads only add overhead (and stall badly on a busy 2-core box).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread_math")`. (Math attention
    is what every CPU model holds: build_model chooses it on CPU.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
