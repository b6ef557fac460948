import jax
import pytest


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a test body with and without jax.jit around the function under test."""
    return (lambda fn, **kw: fn) if request.param == "eager" else (lambda fn, **kw: jax.jit(fn, **kw))
