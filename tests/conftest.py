"""Tiny checkpoints with the real architecture, built once per test session, and an isolated HF cache."""

import os
import shutil
import tempfile
from pathlib import Path

# Read by huggingface_hub at import time: no test may download, and the cache is ours alone.
_HF_HOME = tempfile.mkdtemp(prefix="pixart-sigma-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_HUB_CACHE", None)

import pytest  # noqa: E402

from pixart_sigma.testing import save_tiny_pipeline, save_tiny_transformer  # noqa: E402

BASE_REPO = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
REPO_512 = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"


def put_in_hub_cache(repo_id: str, source: Path) -> Path:
    """Lay `source` out as a cached hub snapshot, the way `hf download` leaves it."""
    repo_dir = Path(_HF_HOME) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    shutil.rmtree(repo_dir, ignore_errors=True)
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A full tiny pipeline directory (model_index.json + five parts), native size 64."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> str:
    return str(tiny_dir)


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory) -> Path:
    """A transformer-only checkpoint (transformer/ subfolder), like the 512 and 2K releases."""
    return save_tiny_transformer(tmp_path_factory.mktemp("tiny-transformer"), seed=1)


@pytest.fixture(scope="session")
def hub_cache(tiny_dir, tiny_transformer_dir):
    """The 1024 and 512 hub ids present in the (isolated) Hugging Face cache, with tiny weights."""
    return {BASE_REPO: put_in_hub_cache(BASE_REPO, tiny_dir),
            REPO_512: put_in_hub_cache(REPO_512, tiny_transformer_dir)}


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's own `server` fixture (a real server process, tests/serving.py)."""
    with server.client() as client:
        yield client


@pytest.fixture()
def http(server):
    """A fresh HTTP client of the module's own `server` fixture for each test."""
    with server.client() as client:
        yield client


@pytest.fixture
def image_array():
    import numpy as np

    return lambda image: np.asarray(image).astype(int)
