"""A real, deterministic OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

`serve(respond, log=None)` starts a `ThreadingHTTPServer` on a free port in a background thread and yields its
base URL (`http://127.0.0.1:PORT/v1`); `ChatClient(base_url, ...)` then POSTs to `{base_url}/chat/completions`.

`respond(request_json, attempt) -> (status, body, headers, delay_s)` decides every answer:
- `request_json` is the parsed POST body (`{'model', 'messages', ...}`).
- `attempt` is 1 for the first time this exact body arrives, 2 for its first retry, and so on (counted per body,
  so concurrent different requests do not disturb each other's counts).
- `body` is a dict (sent as JSON), str or bytes (sent as is, so malformed JSON is easy); `headers` a dict
  (`Retry-After`, or a lying `Content-Length` for a truncated body); the server sleeps `delay_s` before answering
  (longer than the client's timeout_s simulates a timeout). `ok(content)` and `chat_response(content)` build the
  normal answer.

`RequestLog` records every request (`requests`: path, headers, json), `count`, and `max_in_flight`, the largest
number of requests received but not yet answered at once.

`deterministic_llm` is a default responder other tests may rely on. It reads the last message with role 'user'
(string content, or the 'text' parts of a list content) and answers, case-sensitively:
- if it contains 'EXPLAIN': 'latent about W', where W is the first whitespace-separated word inside the first
  `<<...>>` marker anywhere in that message (so instructions must not show a literal marker), or
  'latent about nothing' if there is none;
- else if it contains 'DETECT': a JSON list such as '[1, 0, 1]' with one 0/1 per numbered example. An example
  starts at a line beginning `N.`, `N)` or `N:` (N digits, optional leading spaces) and runs until the next such
  line or the first blank line; it is predicted 1 exactly when its text contains '<<';
- otherwise: 'OK'.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

Response = tuple[int, Any, dict, float]
Responder = Callable[[dict, int], Response]

_MARKED = re.compile(r'<<(.*?)>>', re.DOTALL)
_NUMBERED = re.compile(r'^\s*\d+[.):]')


def chat_response(content: str | None, model: str = 'fake-model') -> dict:
  """The JSON body of a normal, non-streaming chat completion answering `content`."""
  return {
    'id': 'chatcmpl-fake',
    'object': 'chat.completion',
    'created': 0,
    'model': model,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': content}, 'finish_reason': 'stop'}],
    'usage': {'prompt_tokens': 0, 'completion_tokens': 0, 'total_tokens': 0},
  }


def ok(content: str, delay_s: float = 0.0) -> Response:
  """A 200 answer with `content`."""
  return 200, chat_response(content), {}, delay_s


def last_user_text(messages: list[dict]) -> str:
  """The text of the last 'user' message ('' if none)."""
  for message in reversed(messages):
    if message.get('role') == 'user':
      content = message.get('content')
      if isinstance(content, list):
        return '\n'.join(p.get('text', '') for p in content if isinstance(p, dict))
      return content or ''
  return ''


def deterministic_answer(messages: list[dict]) -> str:
  """What `deterministic_llm` answers to `messages` (see the module docstring)."""
  text = last_user_text(messages)
  if 'EXPLAIN' in text:
    for marked in _MARKED.findall(text):
      if marked.split():
        return f'latent about {marked.split()[0]}'
    return 'latent about nothing'
  if 'DETECT' in text:
    examples: list[list[str]] = []
    in_example = False
    for line in text.splitlines():
      if _NUMBERED.match(line):
        examples.append([line])
        in_example = True
      elif not line.strip():
        in_example = False
      elif in_example:
        examples[-1].append(line)
    return json.dumps([int('<<' in '\n'.join(lines)) for lines in examples])
  return 'OK'


def deterministic_llm(request_json: dict, attempt: int) -> Response:
  """A responder answering every request at once with `deterministic_answer`."""
  del attempt
  return ok(deterministic_answer(request_json.get('messages', [])))


class RequestLog:
  """Every request the server received, with the peak number answered concurrently."""

  def __init__(self):
    self.lock = threading.Lock()
    self.requests: list[dict] = []
    self.in_flight = 0
    self.max_in_flight = 0
    self._seen: Counter[str] = Counter()

  @property
  def count(self) -> int:
    with self.lock:
      return len(self.requests)

  def arrive(self, path: str, headers: dict, body: dict) -> int:
    """Records one request; its attempt number for this exact body."""
    key = json.dumps(body, sort_keys=True)
    with self.lock:
      self.requests.append({'path': path, 'headers': headers, 'json': body})
      self._seen[key] += 1
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      return self._seen[key]

  def leave(self) -> None:
    with self.lock:
      self.in_flight -= 1


def _handler(respond: Responder, log: RequestLog) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # Silences the default stderr access log.
      del args

    def do_POST(self):
      raw = self.rfile.read(int(self.headers.get('Content-Length') or 0))
      try:
        body = json.loads(raw)
      except ValueError:
        body = {'_unparseable': raw.decode('utf-8', 'replace')}
      attempt = log.arrive(self.path, dict(self.headers), body)
      try:
        status, payload, headers, delay_s = respond(body, attempt)
        if delay_s:
          time.sleep(delay_s)
      finally:
        # Leave before answering: the client can only send its next request after reading this answer.
        log.leave()
      if isinstance(payload, dict | list):
        payload = json.dumps(payload).encode('utf-8')
      elif isinstance(payload, str):
        payload = payload.encode('utf-8')
      headers = dict(headers or {})
      headers.setdefault('Content-Type', 'application/json')
      headers.setdefault('Content-Length', str(len(payload)))
      try:
        self.send_response(status)
        for name, value in headers.items():
          self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(payload)
      except (BrokenPipeError, ConnectionResetError):
        pass  # The client gave up (timeout) before this answer.

  return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    del request, client_address


class FakeChatServer:
  """The server itself; `serve` is the usual way in."""

  def __init__(self, respond: Responder = deterministic_llm, log: RequestLog | None = None):
    self.log = log if log is not None else RequestLog()
    self._server = _QuietServer(('127.0.0.1', 0), _handler(respond, self.log))
    self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)

  @property
  def base_url(self) -> str:
    return f'http://127.0.0.1:{self._server.server_address[1]}/v1'

  def start(self) -> str:
    self._thread.start()
    return self.base_url

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()


@contextlib.contextmanager
def serve(respond: Responder = deterministic_llm, log: RequestLog | None = None) -> Iterator[str]:
  """Runs a fake server answering with `respond` (recording into `log` when given); yields its base URL."""
  server = FakeChatServer(respond, log)
  try:
    yield server.start()
  finally:
    server.stop()
