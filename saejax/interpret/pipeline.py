"""Explain and score latents with an LLM: contexts in, one JSON line per finished latent out.

For every chosen latent of one seed: an explanation from its top activating windows, then detection scoring on
`detect_active` activating and `detect_inactive` non-activating windows (the paper: 100 and 100), in prompts of
`per_prompt` examples. Latents are processed in chunks through `ChatClient.complete_many`, and every finished
latent is appended to `RUN/interpret/scores_<seed>.jsonl` (flushed and fsynced) as soon as its chunk is done,
so an interrupted run loses nothing already scored and a rerun skips the latents already in the file. Answers
the client already paid for sit in its disk cache, so a rerun never pays twice for them either.

A latent whose requests failed for good (server errors after the client's retries) is not written: the next
run retries it. An answer that cannot be parsed is a failed item: an unreadable explanation finishes the latent
with a null score, an unreadable detection answer drops its examples from the balanced accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from saejax import storage
from saejax.interpret import prompts
from saejax.interpret.contexts import Contexts


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
  """How latents are explained and scored; a scores file is only ever extended under the same settings."""

  explain_examples: int = 20
  detect_active: int = 100
  detect_inactive: int = 100
  per_prompt: int = 10
  marks: bool = False  # self-test: mark activating tokens in detection prompts too
  seed: int = 0
  explain_max_tokens: int = 200
  detect_max_tokens: int = 200

  def settings_id(self, model: str) -> str:
    """A short hash of the settings and the model, stored in every line of a scores file."""
    text = json.dumps({'model': model, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class SettingsMismatchError(ValueError):
  """A scores file holds latents scored under other settings; the message says what to do."""


def scores_path(run: str, seed: str) -> str:
  return storage.join(run, 'interpret', f'scores_{seed}.jsonl')


def read_scores(path: str) -> list[dict[str, Any]]:
  """Every complete line of a scores file (a line cut short by a kill is ignored)."""
  if not storage.exists(path):
    return []
  records = []
  for line in storage.read_text(path).splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and 'latent' in record:
      records.append(record)
  return records


def finished_latents(path: str, settings_id: str) -> set[int]:
  records = read_scores(path)
  other = {r.get('settings_id') for r in records} - {settings_id}
  if other:
    raise SettingsMismatchError(
      f'{path} holds latents scored with other settings or model ({sorted(other)[0]}); '
      'rerun with the same flags, or move the file away to start over'
    )
  return {int(r['latent']) for r in records}


def _append(path: str, records: Sequence[dict[str, Any]]) -> None:
  storage.append_lines(path, [json.dumps(r) for r in records])


def _texts(contexts: Contexts, index: int, which: str, decode: Callable, marks: bool) -> list[str]:
  return [prompts.mark_window(decode.pieces(tokens), acts, marks) for tokens, acts in contexts.examples(index, which)]


def detection_items(contexts: Contexts, index: int, settings: ScoringSettings, decode) -> tuple[list[str], list[int]]:
  """Activating (random sample, minus the explainer's windows) and non-activating texts, with 0/1 truth."""
  shown = set(contexts.window_ids(index, 'top')[: settings.explain_examples].tolist())
  act_ids = contexts.window_ids(index, 'act')
  active = [t for t, w in zip(_texts(contexts, index, 'act', decode, settings.marks), act_ids) if int(w) not in shown]
  active = active[: settings.detect_active]
  inactive = _texts(contexts, index, 'non', decode, settings.marks)[: settings.detect_inactive]
  return active + inactive, [1] * len(active) + [0] * len(inactive)


def _detect_requests(latent: int, explanation: str, items: list[str], settings: ScoringSettings, n_active: int):
  rng = np.random.default_rng([settings.seed, latent])
  layout = prompts.detection_layout(n_active, len(items) - n_active, settings.per_prompt, rng)
  params = {'temperature': 0.0, 'max_tokens': settings.detect_max_tokens}
  return layout, [(prompts.detect_messages(explanation, [items[i] for i in slots]), params) for slots in layout]


def score_latents(
  contexts: Contexts,
  latents: Sequence[int],
  client,
  decode,
  settings: ScoringSettings,
  path: str,
  seed_name: str,
  chunk: int = 32,
  progress: bool = True,
) -> dict[str, int]:
  """Explains and scores `latents` (those not yet in `path`); returns counts: done, skipped, failed."""
  from saejax.interpret.client import ChatError

  settings_id = settings.settings_id(client.model)
  done = finished_latents(path, settings_id)
  todo = [int(latent) for latent in latents if int(latent) not in done]
  counts = {'skipped': len(latents) - len(todo), 'done': 0, 'failed': 0}
  explain_params = {'temperature': 0.0, 'max_tokens': settings.explain_max_tokens}
  for start in range(0, len(todo), chunk):
    batch = todo[start : start + chunk]
    records: dict[int, dict[str, Any]] = {}
    explain: dict[int, list] = {}
    for latent in batch:
      index = contexts.index_of(latent)
      shown = _texts(contexts, index, 'top', decode, True)[: settings.explain_examples]
      base = {
        'seed': seed_name,
        'latent': latent,
        'settings_id': settings_id,
        'fired_windows': int(contexts.arrays['fired_windows'][index]),
        'max_activation': float(contexts.arrays['top_value'][index].max(initial=0.0)),
      }
      if not shown:
        records[latent] = {**base, 'explanation': None, 'score': None, 'status': 'no activating windows'}
      else:
        records[latent] = base
        explain[latent] = [prompts.explain_messages(shown), explain_params]
    answers = dict(zip(explain, client.complete_many(list(explain.values()), progress=progress)))
    detect: dict[int, tuple] = {}
    for latent, answer in answers.items():
      if isinstance(answer, ChatError):
        logging.warning('%s latent %d: explanation request failed: %s', seed_name, latent, answer)
        records.pop(latent)
        continue
      explanation = prompts.parse_explanation(answer)
      records[latent]['explanation'] = explanation
      if explanation is None:
        records[latent].update(score=None, status='unparseable explanation', raw_explanation=str(answer)[:500])
        continue
      items, truth = detection_items(contexts, contexts.index_of(latent), settings, decode)
      layout, requests = _detect_requests(latent, explanation, items, settings, sum(truth))
      detect[latent] = (truth, layout, requests)
    flat = [request for _, _, requests in detect.values() for request in requests]
    replies = iter(client.complete_many(flat, progress=progress))
    for latent, (truth, layout, requests) in detect.items():
      got = [next(replies) for _ in requests]
      if any(isinstance(reply, ChatError) for reply in got):
        error = next(reply for reply in got if isinstance(reply, ChatError))
        logging.warning('%s latent %d: detection request failed: %s', seed_name, latent, error)
        records.pop(latent)
        continue
      predicted: list[int | None] = [None] * len(truth)
      for slots, reply in zip(layout, got):
        bits = prompts.parse_detection(reply, len(slots))
        for j, slot in enumerate(slots):
          predicted[int(slot)] = None if bits is None else bits[j]
      result = prompts.balanced_accuracy(truth, predicted)
      records[latent].update(result, status='ok' if result['score'] is not None else 'a class has no answered example')
    _append(path, [records[latent] for latent in batch if latent in records])
    counts['done'] += len(records)
    counts['failed'] += len(batch) - len(records)
  return counts
