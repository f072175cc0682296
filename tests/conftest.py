"""Fixtures shared by every test package."""
import sys
from pathlib import Path

import numpy as np
import pytest

# tests/reference.py (naive references, finite differences) is imported as `reference` by
# every test folder (the folders are not packages)
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)
