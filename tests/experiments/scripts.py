"""The experiments/ scripts as modules, for their tests."""

import importlib
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def experiment_module(name: str):
    """Yields the script ``experiments/<name>.py`` as a module; the scripts import their sibling bench_common and
    vote_replay, so experiments/ is on the path meanwhile."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))
