import os
import tempfile

import jax
import pytest

# One persistent compilation cache for the whole test session, shared with the subprocesses the
# tests start (CLI runs, the multi-process cluster, the notebook's kernel): every tiny training
# run builds its own jitted update step and sampler, which would otherwise compile the same
# programs again each time (most of a tiny run's seconds on 2 CPU cores).
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="optpo_jax_test_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a test body with and without jax.jit around the function under test."""
    return (lambda fn, **kw: fn) if request.param == "eager" else (lambda fn, **kw: jax.jit(fn, **kw))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """A finished 2-step LoRA run, trained once per session (copied by each test that changes it)."""
    from tests.run_configs import LORA, shared_run, tiny_config

    return shared_run(tmp_path_factory, "lora", tiny_config(steps=2, **LORA))


@pytest.fixture
def lora_run_copy(lora_run, tmp_path):
    """A copy of ``lora_run`` for a test that changes it."""
    from tests.run_configs import copy_run

    return copy_run(lora_run, tmp_path)
