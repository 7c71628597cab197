"""Test session setup: CPU backend with 8 fake devices, set before JAX initialises; Hugging Face offline."""

import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ.setdefault('HF_HOME', tempfile.mkdtemp(prefix='saejax-hf-'))
# One XLA compilation cache per test session, shared with the CLI subprocesses (they inherit the environment):
# the many tiny runs compile the same programs, and a hit skips XLA. Fresh per session, so nothing goes stale.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='saejax-xla-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _smollm2_gguf():
  """SmolLM2-135M's GGUF from saejax's per-machine cache, fetched (93 MB, once per machine) if absent."""
  from saejax.models import registry

  try:
    return registry.gguf_file('smollm2')
  except FileNotFoundError:
    return registry.fetch('smollm2')


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def smollm2_gguf():
  return _smollm2_gguf()


# The longest files (seconds of their tests, `--durations`), started first so that no worker begins one of them
# while the others are running out of work. With `--no-loadscope-reorder`, xdist hands out files in this order.
LONGEST_FIRST = (
  'test_synthetic_preset.py',
  'test_reproduce_smollm2.py',
  'test_training.py',
  'test_sweep.py',
  'test_variants.py',
  'test_reproduce.py',
  'test_multihost.py',
  'test_kernels.py',
  'test_storage.py',
  'test_tracking.py',
  'test_device_check.py',
  'test_gguf.py',
  'test_auxk.py',
  'test_lm_end_to_end.py',
  'test_corpus.py',
  'test_resume.py',
  'test_models.py',
  'test_align_cli.py',
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: the rest keep their order


def session_dir(tmp_path_factory, worker_id: str):
  """A folder of this test session that every xdist worker shares (each worker's own temp root is below it)."""
  if worker_id == 'master':  # no workers (-n0)
    return tmp_path_factory.getbasetemp()
  return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope='session')
def english_corpus(tmp_path_factory, worker_id):
  """The pip-only English corpus (experiments.corpus), built once per test session from the per-machine cache."""
  from saejax.data import corpus

  def build(folder):
    corpus.build(folder / 'english', log=lambda line: None)

  return _once(session_dir(tmp_path_factory, worker_id), 'english_corpus', build) / 'english'


def _once(shared, name: str, build):
  """`build(folder)` once per test session, whichever worker asks first; later callers get the finished folder.

  A marker file says the build finished, so a build that failed is rerun (and fails again, visibly) by the
  next caller instead of being read half-made.
  """
  import shutil

  from filelock import FileLock

  folder, done = shared / name, shared / f'{name}.done'
  with FileLock(shared / f'{name}.lock'):
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope='session')
def tiny_lm(tmp_path_factory, worker_id):
  """tests/tiny_lm.py's (model folder, corpus), made once per session. Read-only: copy before changing it."""
  from tests.tiny_lm import make_tiny_lm

  folder = _once(session_dir(tmp_path_factory, worker_id), 'tiny_lm', make_tiny_lm)
  return folder / 'tiny-neox', folder / 'corpus.jsonl'


@pytest.fixture(scope='session')
def tiny_lm_run(tmp_path_factory, worker_id, tiny_lm):
  """The standard tiny LM run (`tiny_lm.tiny_train_args`), trained and aligned (no PNGs) once per session by the CLI.

  Tests only read it; one that writes into a run folder copies it first.
  """
  from tests.tiny_lm import CONTEXT, ROWS, run_cli, tiny_train_args

  def build(folder):
    workdir = folder / 'run'
    result = run_cli('experiments.train', *tiny_train_args(*tiny_lm, workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(
      'experiments.align', f'--workdir={workdir}', f'--firing_tokens={CONTEXT * ROWS * 4}', '--nofigures'
    )
    assert result.returncode == 0, result.stderr[-3000:]

  return _once(session_dir(tmp_path_factory, worker_id), 'tiny_lm_run', build) / 'run'
