"""Shared fixtures: tiny models built in seconds, one local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tso.toyworld.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random-initialised tiny Llama saved as an ordinary Hugging Face model directory."""
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    path = tmp_path_factory.mktemp("models") / "tiny-random"
    return save_model_dir(random_tiny_llama(tiny_tokenizer, seed=0), tiny_tokenizer, path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with more logical CPUs than cores (PLATFORM-NOTES: Ray on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another cluster running on this machine
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    if ray.is_initialized():  # a `last` test may have shut it down already
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


TIERS = ("vllm", "gpu")  # tiers beyond the default `cpu` one, selected with -m


def pytest_collection_modifyitems(config, items):
    """Every test is in a hardware tier (`cpu` unless marked `vllm` or `gpu`), so `-m cpu` runs what a
    CPU-only machine can. Tests marked `last` run after all others (they stop Ray clusters machine-wide)."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.cpu)
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """TSO_HOME holding the real SmolLM2 matrix, built once (CI's fresh $TSO_HOME keeps it for the whole run)."""
    from pathlib import Path

    from tso.models.fixture import WHEEL_ENV, build_smollm2_matrix

    home = Path(os.environ["TSO_HOME"]) if os.environ.get("TSO_HOME") else tmp_path_factory.mktemp("smollm2-home")
    wheel = os.environ.get(WHEEL_ENV)
    build_smollm2_matrix(home, wheel=Path(wheel) if wheel else None)
    return home
