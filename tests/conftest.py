"""Shared fixtures: one tiny model per session, loaded through the real loading code."""
from __future__ import annotations

import dataclasses
import os

import pytest

from config import FimTemplate, ModelConfig, Settings

from .tiny_models import FIM_TOKENS, build_llama


# The device the shared tiny engines run on: cpu unless FAUXPILOT_TEST_DEVICE names another (bench/gpu_check.py
# runs the engine and scheduler tests with "cuda"); the tests themselves name no device.
TEST_DEVICE = os.environ.get("FAUXPILOT_TEST_DEVICE") or "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real servers or loads the real default model")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny Llama (safetensors) and its byte-level BPE tokenizer."""
    return build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir, tmp_path_factory):
    """Settings serving the tiny model as `tiny` (plain) and `tiny-fim` (with FIM tokens)."""
    plain = ModelConfig(name="tiny", source=str(tiny_model_dir), aliases=("codegen", "copilot-codex"),
                        context_length=256, max_tokens=16, dtype="float32")
    fim = dataclasses.replace(plain, name="tiny-fim", aliases=(), fim=FimTemplate.from_tokens(*FIM_TOKENS))
    # Tests repeat identical requests to check the prefix cache, the scheduler and faults; the answer
    # cache would answer the repeats without them, so it is off here (tests/test_answers.py has it on).
    return Settings(models=(plain, fim), cache_dir=tmp_path_factory.mktemp("cache"), device=TEST_DEVICE,
                    answer_cache=0)


@pytest.fixture(scope="session")
def engines(tiny_settings):
    """The tiny engines, loaded once through app.engine.loader."""
    from app.engine.loader import load_engine

    return {m.name: load_engine(m, tiny_settings) for m in tiny_settings.models}


@pytest.fixture(scope="session")
def engine(engines):
    """The plain tiny engine."""
    return engines["tiny"]


@pytest.fixture()
def app(tiny_settings, engines):
    """The real application factory serving the tiny engines."""
    from app import create_app

    return create_app(tiny_settings, engines=engines.values())


@pytest.fixture()
def client(app):
    """A Flask test client."""
    return app.test_client()
