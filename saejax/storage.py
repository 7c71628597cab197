"""Where run folders live: local disk or object storage (`gs://`, `s3://`), behind one small file API.

Every file saejax reads or writes in a run folder goes through here, so `--workdir=gs://bucket/run` works for
training, exports, alignment, figures and interpretation alike, and every host of a pod sees the same run.

No reader ever sees half a file. On local disk a file is written under a temporary name, fsynced and renamed
into place. On object storage one upload is already atomic: the object appears only once it is complete. A
folder of outputs (an SAE export, an alignment) is built in a local staging folder and then published: renamed
into place on disk; uploaded file by file on object storage, with the file that marks it complete uploaded last.

Object storage has no append, so `append_lines` rewrites the object there; it is meant for small logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from etils import epath

# The schemes epath routes to fsspec; each needs its fsspec backend package installed.
_BACKEND_PACKAGES = {'gs': ('gcsfs', 'gcs'), 's3': ('s3fs', 's3'), 'az': ('adlfs', 'az')}
# Other processes change a run folder (the other hosts, a resumed run, a sweep polling for summary.json), and a
# cached listing would hide their files from this one, so fsspec must ask the store every time.
for _scheme in _BACKEND_PACKAGES:
  fsspec.config.conf.setdefault(_scheme, {}).setdefault('use_listings_cache', False)


def scheme(path: str | os.PathLike) -> str | None:
  """'gs', 's3' or 'az' for an object-storage path, None for a local one."""
  head, sep, _ = os.fspath(path).partition('://')
  if not sep:
    return None
  if head not in _BACKEND_PACKAGES:
    raise ValueError(
      f'{path}: unsupported storage scheme {head}://; use a local path or one of '
      f'{", ".join(s + "://" for s in _BACKEND_PACKAGES)}'
    )
  return head


def is_remote(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def check_reachable(path: str | os.PathLike) -> None:
  """Fails early, in one line, when `path` is on object storage whose client package is not installed."""
  name = scheme(path)
  if name is None:
    return
  package, extra = _BACKEND_PACKAGES[name]
  if importlib.util.find_spec(package) is None:
    raise ValueError(f'{path} is on {name}:// storage, which needs {package}: pip install "saejax[{extra}]"')


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or the object-storage URL unchanged (os.path would mangle 'gs://')."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def basename(path: str | os.PathLike) -> str:
  return posixpath.basename(os.fspath(path).rstrip('/'))


def _epath(path: str | os.PathLike) -> epath.Path:
  check_reachable(path)
  return epath.Path(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
  return _epath(path).exists()


def isfile(path: str | os.PathLike) -> bool:
  return _epath(path).is_file()


def isdir(path: str | os.PathLike) -> bool:
  return _epath(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """Names in the folder `path` (empty when it does not exist), sorted."""
  folder = _epath(path)
  return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []


def makedirs(path: str | os.PathLike) -> None:
  """Creates a local folder; object storage has no folders to create."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
  return _epath(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(read_text(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` atomically (see the module docstring); creates local parent folders."""
  path = os.fspath(path)
  if is_remote(path):
    _epath(path).write_bytes(data)
    return path
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text(path: str | os.PathLike, text: str) -> str:
  return write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> str:
  return write_text(path, json.dumps(data, indent=1, **dump_kwargs) + '\n')


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> str:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(path, buffer.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(read_bytes(path))) as data:
    return {name: data[name] for name in data.files}


def append_lines(path: str | os.PathLike, lines: Sequence[str]) -> None:
  """Appends whole lines, starting on a fresh line if a kill cut the last one short.

  Fsynced on disk; on object storage, which cannot append, the object is rewritten.
  """
  text = ''.join(line.rstrip('\n') + '\n' for line in lines)
  if not text:
    return
  if is_remote(path):
    before = read_text(path) if exists(path) else ''
    write_text(path, before + ('\n' if before and not before.endswith('\n') else '') + text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a+b') as f:
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        text = '\n' + text
    f.write(text.encode('utf-8'))
    f.flush()
    os.fsync(f.fileno())


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, complete_marker: str | None = None) -> Iterator[str]:
  """Yields a local folder to fill; on success publishes it as `target`, replacing what was there.

  On disk the staging folder is a hidden sibling of `target`, swapped in by rename, and an earlier `target` is
  deleted only after the swap. On object storage the files are uploaded, `complete_marker` (a file name inside
  the folder) last and the previous one deleted first, so a reader that waits for the marker never sees a mix.
  On an exception nothing is published and the staging folder is deleted.
  """
  target = absolute(target)
  if is_remote(target):
    check_reachable(target)
    staging = tempfile.mkdtemp(prefix='saejax-stage-')
  else:
    if os.path.exists(target) and not os.path.isdir(target):
      raise ValueError(f'{target} is a file; pass a folder path')
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f'.{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}')
    os.mkdir(staging)  # plain mkdir (not mkdtemp) so outputs get the umask's permissions, not 0700
  try:
    yield staging
    if is_remote(target):
      _upload_dir(staging, target, complete_marker)
    else:
      _fsync_tree(staging)
      _swap_in(staging, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
  for root, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        os.fsync(f.fileno())


def _swap_in(new: str, target: str) -> None:
  old = None
  if os.path.exists(target):
    old = f'{os.path.dirname(target)}/.{os.path.basename(target)}.old-{uuid.uuid4().hex[:8]}'
    os.replace(target, old)
  try:
    os.replace(new, target)
  except BaseException:
    if old:
      os.replace(old, target)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _upload_dir(local: str, target: str, complete_marker: str | None) -> None:
  files = sorted(
    os.path.relpath(os.path.join(root, name), local) for root, _, names in os.walk(local) for name in names
  )
  if complete_marker is not None:
    with contextlib.suppress(FileNotFoundError):
      _epath(join(target, complete_marker)).unlink()
    files = [f for f in files if f != complete_marker] + ([complete_marker] if complete_marker in files else [])
  stale = set(_remote_files(target)) - {f.replace(os.sep, '/') for f in files}
  for rel in files:
    with open(os.path.join(local, rel), 'rb') as source, _epath(join(target, *rel.split(os.sep))).open('wb') as sink:
      shutil.copyfileobj(source, sink, length=16 << 20)
  for rel in stale:
    _epath(join(target, rel)).unlink()


def _remote_files(folder: str) -> list[str]:
  """Relative paths of every object under `folder` (walked level by level: epath refuses '**' on GCS)."""
  found, pending = [], ['']
  while pending:
    prefix = pending.pop()
    here = _epath(join(folder, prefix) if prefix else folder)
    if not here.is_dir():
      continue
    for child in here.iterdir():
      rel = posixpath.join(prefix, child.name) if prefix else child.name
      (pending if child.is_dir() else found).append(rel)
  return found
