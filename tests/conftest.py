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


@pytest.fixture(scope='session')
def english_corpus(tmp_path_factory):
  """The pip-only English corpus (experiments.corpus), built once per test session from the per-machine cache."""
  from saejax.data import corpus

  return corpus.build(tmp_path_factory.mktemp('corpus') / 'english', log=lambda line: None)
