"""Shared test setup: offline by construction, quiet logs, tiny pipelines saved once per session."""

import os


# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


# One thread: on these tiny models a second one barely helps on idle cores (the suite takes the same time), and
# when anything else runs beside the tests, two OpenMP threads fighting for a core slow them more than tenfold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """``tiny_pipeline_dir(family, vae="random") -> Path``: a tiny pipeline saved with ``save_pretrained``, built
    once per session (``vae="shapes"``: with the trained shapes-world VAE, for learning tests)."""
    from diffalign.testing import save_tiny_pipeline

    cache = {}

    def get(family: str, vae: str = "random"):
        if (family, vae) not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{vae}")
            cache[family, vae] = save_tiny_pipeline(family, folder, vae=vae)
        return cache[family, vae]

    return get
