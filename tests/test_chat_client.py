"""ChatClient over real HTTP against tests/fake_chat_server.py: retries, errors, concurrency, cache, key hygiene."""

import json
import logging
import os
import socket
import time
import traceback

import pytest

from saejax.interpret.client import ChatClient, ChatError, cache_key
from tests.fake_chat_server import RequestLog, chat_response, deterministic_answer, deterministic_llm, ok, serve

KEY = 'sk-test-SECRET-d0n7-l34k-7h15-k3y'
FAST = {'backoff_s': 0.01, 'max_backoff_s': 0.05}


def user(text):
  return [{'role': 'user', 'content': text}]


def text_of(request_json):
  return request_json['messages'][-1]['content']


def echo(request_json, attempt):
  del attempt
  return ok('echo: ' + text_of(request_json))


def test_normal_completion_sends_model_params_and_key():
  log = RequestLog()
  with serve(echo, log) as base_url:
    client = ChatClient(base_url, 'm', api_key=KEY, **FAST)
    assert client.complete(user('hi'), temperature=0.0, max_tokens=5) == 'echo: hi'
  assert log.count == 1
  request = log.requests[0]
  assert request['path'] == '/v1/chat/completions'
  assert request['json'] == {'model': 'm', 'messages': user('hi'), 'temperature': 0.0, 'max_tokens': 5}
  assert request['headers']['Authorization'] == f'Bearer {KEY}'


def test_api_key_from_environment_or_none(monkeypatch):
  monkeypatch.delenv('OPENAI_API_KEY', raising=False)
  monkeypatch.setenv('SAEJAX_API_KEY', 'env-key')
  log = RequestLog()
  with serve(echo, log) as base_url:
    ChatClient(base_url, 'm', **FAST).complete(user('a'))
    monkeypatch.delenv('SAEJAX_API_KEY')
    ChatClient(base_url, 'm', **FAST).complete(user('b'))
  assert log.requests[0]['headers']['Authorization'] == 'Bearer env-key'
  assert 'Authorization' not in log.requests[1]['headers']


@pytest.mark.parametrize(
  'failure',
  [
    (429, {'error': {'message': 'slow down'}}, {'Retry-After': '0'}, 0.0),
    (500, 'internal error', {}, 0.0),
    (503, b'', {}, 0.0),
    (200, b'{"choices": [', {}, 0.0),  # malformed JSON
    (200, {'choices': []}, {}, 0.0),  # well-formed but no content
    (200, chat_response(None), {}, 0.0),  # content null
    (200, b'{"choices": []}', {'Content-Length': '500'}, 0.0),  # truncated body
  ],
  ids=['429', '500', '503', 'malformed', 'no-choices', 'null-content', 'incomplete'],
)
def test_transient_failures_are_retried(failure):
  log = RequestLog()

  def respond(request_json, attempt):
    return failure if attempt <= 2 else echo(request_json, attempt)

  with serve(respond, log) as base_url:
    assert ChatClient(base_url, 'm', max_retries=3, **FAST).complete(user('x')) == 'echo: x'
  assert log.count == 3


def test_timeout_then_success():
  log = RequestLog()

  def respond(request_json, attempt):
    return ok('late', delay_s=1.0) if attempt == 1 else echo(request_json, attempt)

  with serve(respond, log) as base_url:
    start = time.monotonic()
    assert ChatClient(base_url, 'm', timeout_s=0.3, **FAST).complete(user('t')) == 'echo: t'
    assert time.monotonic() - start < 0.9
  assert log.count == 2


def test_retry_after_is_honoured_and_capped():
  def respond(request_json, attempt):
    return (429, '', {'Retry-After': '100'}, 0.0) if attempt == 1 else echo(request_json, attempt)

  with serve(respond) as base_url:
    # A large backoff_s would take seconds; Retry-After (capped at max_backoff_s) replaces it.
    client = ChatClient(base_url, 'm', backoff_s=10.0, max_backoff_s=0.1)
    start = time.monotonic()
    assert client.complete(user('r')) == 'echo: r'
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize('status', [400, 401, 404, 422])
def test_other_4xx_raise_at_once(status):
  log = RequestLog()
  respond = lambda r, a: (status, {'error': {'message': 'bad request'}}, {}, 0.0)  # noqa: E731
  with serve(respond, log) as base_url, pytest.raises(ChatError) as info:
    ChatClient(base_url, 'm', max_retries=5, **FAST).complete(user('x'))
  assert log.count == 1
  assert info.value.status == status and info.value.attempts == 1
  assert str(status) in str(info.value) and 'bad request' in str(info.value) and '\n' not in str(info.value)


def test_exhausted_retries_raise_one_line_chat_error():
  log = RequestLog()
  with serve(lambda r, a: (500, 'boom\nsecond line', {}, 0.0), log) as base_url, pytest.raises(ChatError) as info:
    ChatClient(base_url, 'm', max_retries=2, **FAST).complete(user('x'))
  message = str(info.value)
  assert log.count == 3 and info.value.attempts == 3 and info.value.status == 500
  assert '\n' not in message and '500' in message and '3 attempt' in message and 'max_retries' in message


def test_connection_refused_raises_chat_error():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  with pytest.raises(ChatError, match='connection error'):
    ChatClient(f'http://127.0.0.1:{port}/v1', 'm', max_retries=1, **FAST).complete(user('x'))


def test_complete_many_keeps_order_and_other_results():
  def respond(request_json, attempt):
    if 'FAIL' in text_of(request_json):
      return 500, 'permanent', {}, 0.0
    return ok('echo: ' + text_of(request_json), delay_s=0.01 * (hash(text_of(request_json)) % 5))

  texts = [f'q{i}' for i in range(12)]
  texts[5] = 'FAIL'
  requests = [user(t) for t in texts]
  requests[3] = (user(texts[3]), {'temperature': 0.5})
  with serve(respond) as base_url:
    results = ChatClient(base_url, 'm', max_concurrency=4, max_retries=1, **FAST).complete_many(requests)
  assert isinstance(results[5], ChatError) and results[5].status == 500
  assert [r for i, r in enumerate(results) if i != 5] == [f'echo: {t}' for i, t in enumerate(texts) if i != 5]


def test_concurrency_bound_is_respected():
  log = RequestLog()
  with serve(lambda r, a: ok(text_of(r), delay_s=0.05), log) as base_url:
    client = ChatClient(base_url, 'm', max_concurrency=3, **FAST)
    results = client.complete_many([user(str(i)) for i in range(15)], progress=True)
  assert results == [str(i) for i in range(15)]
  assert log.count == 15
  assert 2 <= log.max_in_flight <= 3


def test_cache_hits_cost_no_requests(tmp_path):
  cache = str(tmp_path / 'cache')
  log = RequestLog()
  with serve(echo, log) as base_url:
    client = ChatClient(base_url, 'm', api_key=KEY, cache_dir=cache, **FAST)
    assert client.complete(user('c'), temperature=0.0) == 'echo: c'
    assert client.complete(user('c'), temperature=0.0) == 'echo: c'
    assert log.count == 1
    assert client.complete(user('c'), temperature=1.0) == 'echo: c'  # params are part of the key
    assert log.count == 2
  # A fresh client on the same cache needs no server at all: neither base_url nor key is part of the key.
  fresh = ChatClient('http://127.0.0.1:9/v1', 'm', api_key='other', cache_dir=cache, max_retries=0)
  assert fresh.complete_many([(user('c'), {'temperature': 0.0}), (user('c'), {'temperature': 1.0})]) == ['echo: c'] * 2
  assert (
    ChatClient('http://127.0.0.1:9/v1', 'other-model', cache_dir=cache, max_retries=0, **FAST)
    .complete_many([(user('c'), {'temperature': 0.0})])[0]
    .attempts
    == 1
  )
  files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
  assert len(files) == 2 and all(f.endswith('.json') for f in files)


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
  cache = str(tmp_path / 'cache')
  log = RequestLog()
  with serve(echo, log) as base_url:
    client = ChatClient(base_url, 'm', cache_dir=cache, **FAST)
    client.complete(user('z'))
    path = os.path.join(cache, cache_key('m', user('z'), {})[:2], cache_key('m', user('z'), {}) + '.json')
    for garbage in (
      '{"content": "trunc',
      json.dumps({'model': 'm', 'messages': user('other'), 'params': {}, 'content': 'wrong'}),
    ):
      with open(path, 'w') as f:
        f.write(garbage)
      before = log.count
      assert client.complete(user('z')) == 'echo: z'
      assert log.count == before + 1
      with open(path) as f:
        assert json.load(f)['content'] == 'echo: z'
    assert client.complete(user('z')) == 'echo: z'
    assert log.count == 3


def test_deterministic_llm_protocol():
  explain = 'EXPLAIN the latent.\nExample: the <<cat sat>> on the mat\nAnother: a <<dog>>'
  assert deterministic_answer(user(explain)) == 'latent about cat'
  assert deterministic_answer(user('EXPLAIN nothing marked')) == 'latent about nothing'
  detect = 'DETECT which examples fire.\n\n1. the <<cat>>\n2) no marker\n  3: a long one\n   spanning <<two>> lines\n'
  assert deterministic_answer(user(detect + '\nAnswer with a JSON list.')) == '[1, 0, 1]'
  with serve(deterministic_llm) as base_url:
    assert json.loads(ChatClient(base_url, 'm', **FAST).complete(user(detect))) == [1, 0, 1]


def test_api_key_never_leaks(tmp_path, caplog):
  caplog.set_level(logging.DEBUG)
  cache = str(tmp_path / 'cache')

  def respond(request_json, attempt):
    # A hostile server echoes the Authorization header back in every error body.
    what = text_of(request_json)
    auth = 'bad key ' + KEY
    if what == 'ok':
      return ok('fine')
    if what == '400':
      return 400, {'error': {'message': auth}}, {}, 0.0
    if what == '401':
      return 401, auth, {}, 0.0
    if what == '500':
      return 500, auth, {}, 0.0
    if what == 'malformed':
      return 200, '{"oops": "' + auth, {}, 0.0
    if what == 'timeout':
      return ok(auth, delay_s=0.5)
    return 429, auth, {'Retry-After': '0'}, 0.0

  texts = ['ok', '400', '401', '500', 'malformed', 'timeout', '429']
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    dead_port = s.getsockname()[1]
  with serve(respond) as base_url:
    client = ChatClient(base_url, 'm', api_key=KEY, cache_dir=cache, max_retries=1, timeout_s=0.2, **FAST)
    results = client.complete_many([user(t) for t in texts])
    dead = ChatClient(f'http://127.0.0.1:{dead_port}/v1', 'm', api_key=KEY, max_retries=1, **FAST)
    results += dead.complete_many([user('refused')])
  assert results[0] == 'fine'
  errors = results[1:]
  assert all(isinstance(e, ChatError) for e in errors)
  seen = [repr(client), repr(dead), str(vars(client).get('url')), caplog.text]
  for e in errors:
    seen += [str(e), repr(e), ''.join(traceback.format_exception(e))]
  for record in caplog.records:
    seen.append(record.getMessage())
  for d, _, files in os.walk(cache):
    for f in files:
      with open(os.path.join(d, f)) as fh:
        seen.append(fh.read())
  assert len(seen) > 10 and 'retry' in caplog.text
  for text in seen:
    assert KEY not in text
  assert any('***' in str(e) for e in errors)
