"""LLM interpretability (paper section 5): prompts and parsing, scoring against a real local fake server, and
`experiments.interpret` end to end on a tiny aligned LM run (contexts, scores, figures, rerun, interruption)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from saejax.interpret import prompts
from tests import forkserver
from tests.fake_chat_server import RequestLog, deterministic_answer, deterministic_llm, ok, serve
from tests.tiny_lm import CLI_ENV, CONTEXT, ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {name: value for name, value in CLI_ENV.items() if name != 'OPENAI_API_KEY'}


def test_mark_window_wraps_runs_of_active_tokens_on_one_line():
  text = prompts.mark_window(['a', ' b', ' c', '\nd', ' e'], [0, 1.5, 2.0, 0, 0.1])
  assert text == 'a<< b c>>↵d<< e>>'
  assert prompts.mark_window(['a', ' b'], [1, 1], marks=False) == 'a b'


def test_explain_prompt_marks_examples_and_fake_llm_reads_them():
  messages = prompts.explain_messages(['the << sparse>> latent', 'a << model>>'])
  assert 'EXPLAIN' in messages[-1]['content'] and messages[-1]['role'] == 'user'
  assert prompts.parse_explanation(deterministic_answer(messages)) == 'latent about sparse'


@pytest.mark.parametrize(
  'answer, expected',
  [
    ('Numbers in citations.', 'Numbers in citations.'),
    ('```\nExplanation: "Percent signs."\n```', 'Percent signs.'),
    ('Sure! Here it is.\nExplanation: adverbs of frequency', 'adverbs of frequency'),
    ('', None),
    ('   \n ``` ```', None),
    (None, None),
  ],
)
def test_parse_explanation_tolerates_fences_and_preamble(answer, expected):
  assert prompts.parse_explanation(answer) == expected


@pytest.mark.parametrize(
  'answer, n, expected',
  [
    ('[1, 0, 1]', 3, [1, 0, 1]),
    ('```json\n[true, false]\n```', 2, [1, 0]),
    ('My reasoning: example [2] fits.\nAnswer: ["1", "0", "0"]', 3, [1, 0, 0]),
    ('[1, 0]', 3, None),
    ('[1, 2, 0]', 3, None),
    ('no list here', 2, None),
    ('[1, 0', 2, None),
    (None, 1, None),
  ],
)
def test_parse_detection_is_tolerant_and_never_raises(answer, n, expected):
  assert prompts.parse_detection(answer, n) == expected


def test_detection_prompt_is_numbered_and_unmarked_by_default():
  items = [prompts.mark_window(['x', ' y'], acts, marks) for acts, marks in (([0, 1], False), ([0, 0], False))]
  messages = prompts.detect_messages('latent about y', items)
  assert 'DETECT' in messages[-1]['content'] and '<<' not in messages[-1]['content']
  assert prompts.parse_detection(deterministic_answer(messages), 2) == [0, 0]  # nothing marked: all 0
  marked = [prompts.mark_window(['x', ' y'], [0, 1]), prompts.mark_window(['x', ' y'], [0, 0])]
  assert prompts.parse_detection(deterministic_answer(prompts.detect_messages('e', marked)), 2) == [1, 0]


def test_balanced_accuracy_and_deterministic_layout():
  result = prompts.balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0])
  assert result['score'] == pytest.approx(0.75) and result['tpr'] == 0.5 and result['tnr'] == 1.0
  failed = prompts.balanced_accuracy([1, 1, 0, 0], [1, None, None, 1])
  assert failed['score'] == pytest.approx(0.5) and failed['n_failed'] == 2
  assert prompts.balanced_accuracy([1, 0], [None, None])['score'] is None
  assert prompts.balanced_accuracy([1, 1, 0], [1, 1, None])['score'] is None  # one class answered
  a = prompts.detection_layout(5, 5, 3, np.random.default_rng([0, 7]))
  b = prompts.detection_layout(5, 5, 3, np.random.default_rng([0, 7]))
  assert [x.tolist() for x in a] == [x.tolist() for x in b] and sorted(np.concatenate(a)) == list(range(10))
  assert [len(x) for x in a] == [3, 3, 3, 1]


def run_module(module, *args, timeout=600):
  return forkserver.run(
    [sys.executable, '-m', module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope='module')
def aligned_run(tiny_lm_run, tmp_path_factory):
  """The session's tiny LM run (three seeds, trained and aligned as tests/test_lm_end_to_end.py checks), copied
  here because interpret writes into the run folder."""
  workdir = tmp_path_factory.mktemp('interpret') / 'run'
  shutil.copytree(tiny_lm_run, workdir)
  return workdir


def interpret_args(workdir, base_url, *extra):
  return (
    'experiments.interpret',
    f'--workdir={workdir}',
    f'--base_url={base_url}',
    '--model=fake-model',
    '--seeds=0,1',
    '--latents=3',
    f'--tokens={CONTEXT * ROWS * 8}',
    '--window=8',
    '--explain_examples=4',
    '--detect_examples=6',
    '--per_prompt=4',
    '--detection_marks',
    '--max_retries=0',
    *extra,
  )


def scores(workdir, seed):
  path = workdir / 'interpret' / f'scores_seed{seed}.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_interpret_end_to_end_rerun_and_interruption(aligned_run, tmp_path):
  workdir = aligned_run
  # Bad input: one line, exit 2.
  result = run_module('experiments.interpret', f'--workdir={tmp_path}', '--base_url=http://127.0.0.1:9/v1', '--model=m')
  assert result.returncode == 2 and 'no config.json' in result.stderr
  result = run_module(*interpret_args(workdir, 'http://127.0.0.1:9/v1'))
  assert result.returncode == 2 and 'cannot reach the server' in result.stderr, result.stderr[-2000:]

  # Interrupted: every detection request of some latents fails for good (500); the others are written.
  def flaky(request_json, attempt):
    text = json.dumps(request_json['messages'])
    if 'DETECT' in text and hash(text) % 3 == 0:
      return 500, {'error': 'down'}, {}, 0.0
    return deterministic_llm(request_json, attempt)

  log = RequestLog()
  with serve(flaky, log) as base_url:
    result = run_module(*interpret_args(workdir, base_url, '--api_key=sk-secret-test-key'))
  assert result.returncode == 1 and 'rerun to retry' in result.stderr, result.stderr[-3000:]
  first = {seed: scores(workdir, seed) for seed in (0, 1)}
  assert sum(map(len, first.values())) > 0
  assert all(r['headers'].get('Authorization') == 'Bearer sk-secret-test-key' for r in log.requests)

  # Rerun: the scores already written stay as they are and only the missing latents are finished.
  with serve(deterministic_llm) as base_url:
    result = run_module(*interpret_args(workdir, base_url))
  assert result.returncode == 0, result.stderr[-3000:]
  for seed in (0, 1):
    records = scores(workdir, seed)
    assert records[: len(first[seed])] == first[seed]
    scored = [r for r in records if r['score'] is not None]
    assert scored and all(r['score'] == 1.0 for r in scored)  # the fake predicts exactly the marked examples
    assert all(0.0 <= r['score'] <= 1.0 for r in scored)
    assert len({r['latent'] for r in records}) == len(records)
    with np.load(workdir / 'interpret' / f'contexts_seed{seed}.npz') as stored:
      latents = set(stored['latents'].tolist())
      assert stored['top_tokens'].shape[1:] == (4, 8) and stored['non_tokens'].shape[1:] == (10, 8)
      assert np.all(stored['top_value'][stored['top_window'] >= 0] > 0)
    assert {r['latent'] for r in records} == latents
  interpret = workdir / 'interpret'
  for name in ('fig6_left_scores_by_sharing.png', 'fig6_right_matched_scores.png', 'report.md'):
    assert (interpret / name).stat().st_size > 0
  assert 'Table 1' in (interpret / 'report.md').read_text()
  leaked = [p for p in interpret.rglob('*') if p.is_file() and b'sk-secret-test-key' in p.read_bytes()]
  assert not leaked

  # A third run has nothing left to do: zero requests.
  log = RequestLog()
  with serve(deterministic_llm, log) as base_url:
    result = run_module(*interpret_args(workdir, base_url))
  assert result.returncode == 0, result.stderr[-3000:]
  assert log.count == 0


@pytest.mark.slow
def test_killed_run_keeps_written_scores(aligned_run, tmp_path):
  """A run killed mid-way keeps every line already written, and the rerun completes the rest."""
  workdir = tmp_path / 'run'
  shutil.copytree(aligned_run, workdir, ignore=shutil.ignore_patterns('interpret'))

  def slow(request_json, attempt):
    time.sleep(0.3)
    return deterministic_llm(request_json, attempt)

  with serve(slow) as base_url:
    process = forkserver.popen(
      [sys.executable, '-m', *interpret_args(workdir, base_url, '--max_concurrency=1')],
      cwd=ROOT,
      env=ENV,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    try:
      deadline = time.time() + 300
      while not scores(workdir, 0) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    finally:
      process.kill()
      process.wait()
  written = scores(workdir, 0)
  assert written
  with serve(ok_or_deterministic) as base_url:
    result = run_module(*interpret_args(workdir, base_url))
  assert result.returncode == 0, result.stderr[-3000:]
  assert scores(workdir, 0)[: len(written)] == written


def ok_or_deterministic(request_json, attempt):
  return deterministic_llm(request_json, attempt) if request_json.get('messages') else ok('OK')
