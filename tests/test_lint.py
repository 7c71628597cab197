"""The tree stays ruff-clean (configured in pyproject.toml)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.skip('ruff is not installed (pip install -e .[test])')
  result = subprocess.run([ruff, 'check', '--quiet', ROOT], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
