"""Shared pytest fixtures: a real Redis on a scratch database, tiny models on disk, offline hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub is offline and caches live in a temp dir per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
def redis_url() -> str:
    """URL of a scratch Redis database, flushed before and after the test."""
    import redis

    conn = redis.Redis.from_url(REDIS_TEST_URL)
    conn.flushdb()
    yield REDIS_TEST_URL
    conn.flushdb()
    conn.close()


@pytest.fixture
def redis_conn(redis_url):
    import redis

    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_factory(models_root):
    """Call with a tiny preset name; returns the model directory (built once per session)."""
    from tests.fixtures.models import tiny_model_dir

    return lambda preset: tiny_model_dir(preset, models_root)
