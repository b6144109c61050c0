"""Fixtures of the code blocks in docs/ and README.md (pytest-markdown-docs).

    python -m pytest -rs --markdown-docs --markdown-docs-syntax=superfences -m markdown-docs docs README.md

Every Python block runs, in a fresh temporary directory with `examples/`
beside it, unless its fence names one of the fixtures below, which skips it
with the reason (`-rs` prints it): ```{.python fixture:needs_network} in the
docs, ```python fixture:needs_network in the README. At the repository root
so that README.md's blocks get them too; the tests in tests/ use none of it.
"""

import os

import pytest

REPOSITORY = os.path.dirname(os.path.abspath(__file__))
MARKDOWN_DOCS = "markdown-docs"  # the marker pytest-markdown-docs gives its items


@pytest.fixture
def needs_network():
    pytest.skip("downloads an official checkpoint or a dataset (no network in CI)")


@pytest.fixture
def needs_accelerator():
    pytest.skip("trains a full-size model: hours on an accelerator")


@pytest.fixture(autouse=True)
def _markdown_block_directory(request):
    """A docs block runs in its own empty directory (what it saves stays
    there), with the repository's examples/ (the sample photos) linked in."""
    if request.node.get_closest_marker(MARKDOWN_DOCS) is None:  # a test of tests/: nothing to do
        yield
        return
    import keras

    tmp_path, monkeypatch = request.getfixturevalue("tmp_path"), request.getfixturevalue("monkeypatch")
    os.symlink(os.path.join(REPOSITORY, "examples"), tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
