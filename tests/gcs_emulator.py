"""A local Google Cloud Storage server for tests: `gs://` run folders with no network and no credentials.

Both GCS clients saejax reaches talk to it: gcsfs (behind etils.epath: saejax.storage and Orbax's metadata) through
STORAGE_EMULATOR_HOST, and TensorStore (Orbax's array writer) through TENSORSTORE_GCS_HTTP_URL with a test token.
The server keeps objects in memory and serves one request at a time, which is enough for tiny runs. It does not
send an object's generation with its bytes, as GCS does in `x-goog-generation`; TensorStore needs that header for
its conditional writes (Orbax's OCDBT manifests), so `_send_generation` adds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects


def _send_generation(download):
  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']

  download_with_generation.sends_generation = True
  return download_with_generation


def _patch_downloads() -> None:
  """Routes every download (`?alt=media` GETs go through objects.download too) to the patched handler."""
  if getattr(objects.download, 'sends_generation', False):
    return
  original = objects.download
  objects.download = _send_generation(original)
  for _, methods in emulator_server.HANDLERS:
    for method, handler in methods.items():
      if handler is original:
        methods[method] = objects.download


@contextlib.contextmanager
def gcs_emulator(bucket: str) -> Iterator[dict[str, str]]:
  """Serves `bucket` on 127.0.0.1; yields the environment variables that point clients at it (also set here)."""
  import gcsfs

  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # it logs every 404 as an error
  _patch_downloads()
  server = emulator_server.create_server('127.0.0.1', 0, in_memory=True, default_bucket=bucket)
  server.start()
  url = f'http://127.0.0.1:{server._api._httpd.server_address[1]}'
  env = {
    'STORAGE_EMULATOR_HOST': url,
    'TENSORSTORE_GCS_HTTP_URL': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
    'GOOGLE_CLOUD_PROJECT': 'saejax-test',
  }
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  gcsfs.GCSFileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
  try:
    yield env
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    server.stop()
