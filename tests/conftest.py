"""Shared fixtures. Tests never reach a model hub; tiny random models stand in for real ones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from ssah.models.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spin badly on a busy 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    """Every supported family, one test case each."""
    return request.param


@pytest.fixture
def tiny(family):
    """(model, tokenizer) of a tiny random model of `family`."""
    return tiny_model(family)


@pytest.fixture(scope="session")
def builtin_model():
    """The real built-in model (SmolLM2-135M-Instruct); slow tests only."""
    from ssah.models.loading import load_model

    try:
        return load_model("builtin:smollm2-135m-instruct", device="cpu")
    except Exception as err:  # pragma: no cover - shows the install step in CI output
        pytest.fail(f"built-in model unavailable: {err}")
