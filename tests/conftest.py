"""Shared test set-up: Triton's interpreter on machines without a GPU, and deterministic seeds."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before any test imports triton,
# so the kernels run on the CPU (slowly: keep kernel tests small).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every process the tests start (spawned ranks, torchrun workers, CLI runs) prints the Python stacks of its
# threads if it dies on a signal (SIGABRT, SIGSEGV): a crash in a child then says where it happened.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
