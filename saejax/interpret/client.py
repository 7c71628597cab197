"""A client for any OpenAI-compatible chat-completions server (vLLM, OpenAI, others), standard library only.

`ChatClient` owns the HTTP side of LLM interpretability: POSTing `{base_url}/chat/completions`, retrying transient
failures, bounding concurrency, and caching answers on disk so an interrupted scoring run resumes for free.

- Retries (exponential backoff with jitter, `Retry-After` honoured, both capped at `max_backoff_s`) on HTTP 429,
  5xx, timeouts, connection errors and malformed or incomplete JSON (including a missing or non-string
  `choices[0].message.content`). Other 4xx raise `ChatError` at once. After `max_retries` retries (so
  `max_retries + 1` attempts) `ChatError` carries a one-line message: status, attempts, what to do.
- The API key (argument, else `OPENAI_API_KEY`, else `SAEJAX_API_KEY`) is sent only as `Authorization: Bearer`;
  it is redacted from every message this module builds (errors, logs, reprs) and never written to the cache.
- The cache (`cache_dir`) holds one JSON file per request, named by `cache_key(model, messages, params)`: the
  sha256 of those three only, so a different server or key reuses it. Writes are atomic (saejax.storage,
  so the cache may sit in a gs:// run); an unreadable or inconsistent file is ignored and rewritten.
- `complete_many` runs requests on a thread pool and returns results in input order, a failed item as its
  `ChatError`, so one bad request never loses the others.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm.auto import tqdm

from saejax import storage

logger = logging.getLogger(__name__)

API_KEY_ENV_VARS = ('OPENAI_API_KEY', 'SAEJAX_API_KEY')
_SNIPPET_CHARS = 200


class ChatError(RuntimeError):
  """A chat request that failed for good. The message is one line and never contains the API key."""

  def __init__(self, message: str, *, status: int | None = None, attempts: int = 0):
    super().__init__(message)
    self.status = status
    self.attempts = attempts


class _RetryableError(Exception):
  def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
    super().__init__(reason)
    self.reason, self.status, self.retry_after = reason, status, retry_after


class _FatalError(Exception):
  def __init__(self, reason: str, status: int):
    super().__init__(reason)
    self.reason, self.status = reason, status


def cache_key(model: str, messages: list[dict], params: dict) -> str:
  """sha256 (hex) of the model, messages and sampling params: what determines an answer, not where it came from."""
  blob = json.dumps(
    {'model': model, 'messages': messages, 'params': params}, sort_keys=True, ensure_ascii=False, separators=(',', ':')
  )
  return hashlib.sha256(blob.encode('utf-8')).hexdigest()


def _one_line(text: str, limit: int = _SNIPPET_CHARS) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _parse_retry_after(value: str | None) -> float | None:
  """Seconds from a `Retry-After` header (delta-seconds or HTTP date); None when absent or unreadable."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  return max(0.0, when.timestamp() - time.time())


def _public_url(url: str) -> str:
  """The URL without any user:password part, for messages."""
  parts = urllib.parse.urlsplit(url)
  if '@' not in parts.netloc:
    return url
  return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit('@', 1)[1]))


def _is_loopback(url: str) -> bool:
  host = (urllib.parse.urlsplit(url).hostname or '').lower()
  return host in ('localhost', '::1') or host.startswith('127.')


def _as_request(item: Any) -> tuple[list[dict], dict]:
  """`(messages, params)` from either that pair or bare messages."""
  if isinstance(item, tuple) or (
    isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and isinstance(item[1], dict)
  ):
    messages, params = item
    return list(messages), dict(params or {})
  return list(item), {}


class ChatClient:
  """Chat completions against `{base_url}/chat/completions`, with retries, a concurrency bound and a disk cache."""

  def __init__(
    self,
    base_url: str,
    model: str,
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_retries: int = 5,
    timeout_s: float = 60.0,
    cache_dir: str | None = None,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
  ):
    if max_concurrency < 1:
      raise ValueError(f'max_concurrency must be >= 1, got {max_concurrency}')
    if max_retries < 0:
      raise ValueError(f'max_retries must be >= 0, got {max_retries}')
    self.base_url = base_url.rstrip('/')
    self.url = self.base_url + '/chat/completions'
    self.model = model
    self.max_concurrency = max_concurrency
    self.max_retries = max_retries
    self.timeout_s = timeout_s
    self.cache_dir = cache_dir
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    if api_key is None:
      api_key = next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
    self._api_key = api_key or None
    self._slots = threading.BoundedSemaphore(max_concurrency)
    self._random = random.Random()
    # A local server (vLLM) must not be reached through an http_proxy from the environment; remote ones may.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
    self._opener = urllib.request.build_opener(*handlers)
    if cache_dir:
      storage.makedirs(cache_dir)

  def __repr__(self) -> str:
    key = "'***'" if self._api_key else 'None'
    return (
      f'ChatClient(base_url={_public_url(self.base_url)!r}, model={self.model!r}, api_key={key}, '
      f'max_concurrency={self.max_concurrency}, max_retries={self.max_retries}, cache_dir={self.cache_dir!r})'
    )

  def _redact(self, text: str) -> str:
    return text.replace(self._api_key, '***') if self._api_key else text

  # --- cache ---

  def _cache_path(self, key: str) -> str:
    return storage.join(self.cache_dir, key[:2], key + '.json')

  def _cache_get(self, key: str) -> str | None:
    if not self.cache_dir:
      return None
    path = self._cache_path(key)
    try:
      entry = storage.read_json(path)
      if cache_key(entry['model'], entry['messages'], entry['params']) == key and isinstance(entry['content'], str):
        return entry['content']
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError, TypeError):
      pass
    logger.warning('ignoring unreadable chat cache entry %s; it will be rewritten', path)
    return None

  def _cache_put(self, key: str, model: str, messages: list[dict], params: dict, content: str) -> None:
    if not self.cache_dir:
      return
    path = self._cache_path(key)
    entry = {'model': model, 'messages': messages, 'params': params, 'content': content}
    try:
      storage.write_json(path, entry, ensure_ascii=False)
    except OSError as e:
      logger.warning('could not write chat cache entry %s: %s', path, _one_line(self._redact(str(e))))

  # --- HTTP ---

  def _headers(self) -> dict[str, str]:
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    if self._api_key:
      headers['Authorization'] = f'Bearer {self._api_key}'
    return headers

  def _error_snippet(self, body: bytes) -> str:
    text = body.decode('utf-8', errors='replace')
    try:
      error = json.loads(text).get('error')
      text = error.get('message', text) if isinstance(error, dict) else (error or text)
    except (ValueError, AttributeError):
      pass
    return _one_line(self._redact(str(text))) or '(empty body)'

  def _attempt(self, payload: bytes) -> str:
    """One POST; the content string, or `_RetryableError` / `_FatalError` with a redacted one-line reason."""
    request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method='POST')
    try:
      with self._opener.open(request, timeout=self.timeout_s) as response:
        body = response.read()
    except urllib.error.HTTPError as e:
      try:
        body = e.read()
      except (OSError, http.client.HTTPException):
        body = b''
      retry_after = _parse_retry_after(e.headers.get('Retry-After') if e.headers else None)
      e.close()
      reason = f'HTTP {e.code}: {self._error_snippet(body)}'
      if e.code == 429 or e.code >= 500:
        raise _RetryableError(reason, e.code, retry_after) from None
      raise _FatalError(reason, e.code) from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, TimeoutError):
        raise _RetryableError(f'timed out after {self.timeout_s:g}s') from None
      raise _RetryableError(f'connection error: {_one_line(self._redact(str(e.reason)))}') from None
    except TimeoutError:
      raise _RetryableError(f'timed out after {self.timeout_s:g}s') from None
    except (OSError, http.client.HTTPException) as e:
      raise _RetryableError(f'connection error: {type(e).__name__}: {_one_line(self._redact(str(e)))}') from None
    try:
      content = json.loads(body)['choices'][0]['message']['content']
    except (ValueError, KeyError, IndexError, TypeError):
      content = None
    if not isinstance(content, str):
      snippet = _one_line(self._redact(body.decode('utf-8', 'replace'))) or '(empty body)'
      raise _RetryableError(f'malformed response (no choices[0].message.content text): {snippet}')
    return content

  def _delay(self, retry: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(retry_after, self.max_backoff_s)
    base = self.backoff_s * 2 ** (retry - 1)
    return min(self.max_backoff_s, base + self._random.uniform(0, self.backoff_s))

  def _post(self, payload: bytes) -> str:
    attempts = self.max_retries + 1
    last: _RetryableError | None = None
    for attempt in range(1, attempts + 1):
      try:
        with self._slots:
          return self._attempt(payload)
      except _FatalError as e:
        advice = {
          401: 'check the API key (OPENAI_API_KEY or SAEJAX_API_KEY)',
          403: 'check the API key and its access',
          404: f'check base_url (usually ends in /v1) and that model {self.model!r} is served',
        }.get(e.status, 'fix the request (model name, parameters)')
        raise ChatError(
          self._redact(
            f'chat request to {_public_url(self.url)} rejected after {attempt} attempt(s) '
            f'with {e.reason}; not retried: {advice}'
          ),
          status=e.status,
          attempts=attempt,
        ) from None
      except _RetryableError as e:
        last = e
        if attempt == attempts:
          break
        delay = self._delay(attempt, e.retry_after)
        logger.warning(
          'chat request to %s failed (%s); retry %d/%d in %.2fs',
          _public_url(self.url),
          e.reason,
          attempt,
          self.max_retries,
          delay,
        )
        time.sleep(delay)
    assert last is not None
    raise ChatError(
      self._redact(
        f'chat request to {_public_url(self.url)} failed after {attempts} attempt(s) (last: {last.reason}); check the '
        f'server is up and serves model {self.model!r}, or raise max_retries / timeout_s'
      ),
      status=last.status,
      attempts=attempts,
    )

  # --- public API ---

  def complete(self, messages: list[dict], **params: Any) -> str:
    """`choices[0].message.content` for `messages`; `params` (temperature, max_tokens, ...) go into the body."""
    if params.get('stream'):
      raise ValueError('stream=True is not supported: ChatClient reads whole responses')
    key = cache_key(self.model, messages, params)
    cached = self._cache_get(key)
    if cached is not None:
      return cached
    payload = json.dumps({'model': self.model, 'messages': messages, **params}).encode('utf-8')
    content = self._post(payload)
    self._cache_put(key, self.model, messages, params, content)
    return content

  def _complete_or_error(self, messages: list[dict], params: dict) -> str | ChatError:
    try:
      return self.complete(messages, **params)
    except ChatError as e:
      return e
    except Exception as e:  # One bad item must not lose the others' results.
      return ChatError(self._redact(_one_line(f'chat request could not be made: {type(e).__name__}: {e}')))

  def complete_many(
    self, requests: list[tuple[list[dict], dict]] | list[list[dict]], progress: bool = False
  ) -> list[str | ChatError]:
    """`complete` for each `(messages, params)` pair or bare `messages`, `max_concurrency` at a time.

    Results are in input order; a request that failed for good is its `ChatError` in place of the text.
    """
    items = [_as_request(r) for r in requests]
    results: list[str | ChatError | None] = [None] * len(items)
    if not items:
      return []
    with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix='chat') as pool:
      futures = {pool.submit(self._complete_or_error, m, p): i for i, (m, p) in enumerate(items)}
      for future in tqdm(
        as_completed(futures), total=len(futures), desc='chat', unit='req', disable=None if progress else True
      ):
        results[futures[future]] = future.result()
    return results  # type: ignore[return-value]
