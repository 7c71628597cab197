"""The tree stays ruff-clean and ruff-formatted (both configured in pyproject.toml)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('command', [['check', '--quiet'], ['format', '--check', '--quiet']], ids=['lint', 'format'])
def test_ruff_is_clean(command):
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.skip('ruff is not installed (pip install -e .[test])')
  result = subprocess.run([ruff, *command, ROOT], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr + '\nfix with: ruff check --fix . && ruff format .'
