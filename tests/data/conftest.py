"""Fixtures shared by the data tests."""

import pytest

from fiber_d2.data.shapes import build_shapes_tokenizer


@pytest.fixture(scope="session")
def shapes_tokenizer_dir(tmp_path_factory):
    """Directory of a freshly trained shapes tokenizer (offline)."""
    path = tmp_path_factory.mktemp("shapes_tokenizer")
    build_shapes_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def shapes_tokenizer(shapes_tokenizer_dir):
    """The shapes tokenizer loaded back with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shapes_tokenizer_dir))
