"""Test parameters over the model families shared by several test files."""

import pytest

from diffalign.testing import FAMILIES


FAMILIES_SD3_FAST = [f if f == "sd3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
"""Every family, the four besides SD3 marked slow: a battery that would take the fast suite past its time limit."""
