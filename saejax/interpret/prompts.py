"""Explainer and detection prompts, the tolerant parsing of their answers, and the detection score.

Explanation (Bills et al., 2023; Paulo et al., 2024): the explainer sees a latent's top activating windows with
every activating token span wrapped in `<<...>>` and answers with a short description. The user message holds
the word EXPLAIN and the examples; the instructions (which may show a literal marker) are the system message.

Detection (Paulo et al., 2024, the paper's section 5): the scorer gets the explanation and numbered windows, a
deterministic shuffle of activating and non-activating ones, and answers with a JSON list of 0/1, one per
example. The examples carry no markers (the scorer must recognise the latent from the explanation alone) unless
`marks=True`, a self-test of the pipeline: a scorer that follows the marks then scores exactly 1.0. The score
is the balanced accuracy, the mean of the true-positive and true-negative rates.

Parsing never raises: an answer that cannot be read is a failed item (None), counted, never a crash.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

EXPLAIN_SYSTEM = (
  'You are a meticulous interpretability researcher studying one latent of a sparse autoencoder trained on a '
  "language model's activations. You will see text excerpts in which the latent fires; the tokens where it fires "
  'are wrapped in double angle brackets, like <<this>>. Find what the marked tokens and their contexts have in '
  'common and describe the latent in one short sentence (at most 30 words). Answer with the description only.'
)
DETECT_SYSTEM = (
  'You are a meticulous interpretability researcher. You will see the explanation of one latent of a sparse '
  "autoencoder trained on a language model's activations, then numbered text excerpts. For each excerpt decide "
  'whether the latent fires on some token of it, judging from the explanation. Answer with only a JSON list of '
  'integers, 1 if the latent fires and 0 if not, one per excerpt, in order, e.g. [1, 0, 0, 1].'
)
MAX_EXPLANATION_CHARS = 400
_FENCE = re.compile(r'```[a-zA-Z0-9_-]*\s*(.*?)```', re.DOTALL)
_LIST = re.compile(r'\[[^\[\]]*\]')
_LABEL = re.compile(r'^\s*(?:\*\*)?(?:final\s+)?(?:explanation|description|answer)(?:\*\*)?\s*[:\-]\s*', re.I)
_ONE_LINE = str.maketrans({'\n': '↵', '\r': ' ', '\t': ' '})


def mark_window(pieces: Sequence[str], acts: Sequence[float], marks: bool = True) -> str:
  """The window as text, every run of consecutive activating tokens wrapped in `<<...>>` (one line)."""
  out, open_span = [], False
  for piece, act in zip(pieces, acts):
    active = marks and float(act) > 0
    if active and not open_span:
      out.append('<<')
    elif not active and open_span:
      out.append('>>')
    open_span = active
    out.append(piece)
  if open_span:
    out.append('>>')
  return ''.join(out).translate(_ONE_LINE)


def explain_messages(examples: Sequence[str]) -> list[dict[str, str]]:
  """Chat messages asking for an explanation of a latent from its marked examples."""
  body = '\n'.join(f'Example {i + 1}: {text}' for i, text in enumerate(examples))
  user = f'EXPLAIN the latent from these excerpts, where it fires on the marked tokens.\n\n{body}\n'
  return [{'role': 'system', 'content': EXPLAIN_SYSTEM}, {'role': 'user', 'content': user}]


def detect_messages(explanation: str, examples: Sequence[str]) -> list[dict[str, str]]:
  """Chat messages asking which of the numbered `examples` activate the latent described by `explanation`."""
  body = '\n'.join(f'{i + 1}. {text}' for i, text in enumerate(examples))
  user = (
    f'DETECT which excerpts activate the latent.\nExplanation: {explanation.translate(_ONE_LINE)}\n\n'
    f'Excerpts:\n{body}\n\nAnswer with a JSON list of {len(examples)} integers (1 = fires, 0 = does not).'
  )
  return [{'role': 'system', 'content': DETECT_SYSTEM}, {'role': 'user', 'content': user}]


def _strip_fences(text: str) -> str:
  fenced = _FENCE.findall(text)
  return '\n'.join(fenced) if fenced else text.replace('```', '')


def parse_explanation(text: Any) -> str | None:
  """The explanation in an answer (code fences, a leading 'Explanation:' and quotes removed); None if empty."""
  if not isinstance(text, str):
    return None
  lines = [line.strip() for line in _strip_fences(text).splitlines() if line.strip()]
  if not lines:
    return None
  labelled = [line for line in lines if _LABEL.match(line)]
  line = _LABEL.sub('', labelled[-1] if labelled else lines[0]).strip().strip('"\'`*').strip()
  if not line:
    return None
  return line[:MAX_EXPLANATION_CHARS]


def _as_bit(value: Any) -> int | None:
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int | float) and value in (0, 1):
    return int(value)
  if isinstance(value, str) and value.strip().lower() in ('0', '1', 'true', 'false', 'yes', 'no'):
    return int(value.strip().lower() in ('1', 'true', 'yes'))
  return None


def parse_detection(text: Any, n: int) -> list[int] | None:
  """The list of `n` 0/1 predictions in an answer (the last readable list of that length), or None."""
  if not isinstance(text, str):
    return None
  for candidate in reversed(_LIST.findall(_strip_fences(text))):
    try:
      values = json.loads(candidate)
    except ValueError:
      continue
    if not isinstance(values, list) or len(values) != n:
      continue
    bits = [_as_bit(v) for v in values]
    if all(b is not None for b in bits):
      return bits  # type: ignore[return-value]
  return None


def detection_layout(n_active: int, n_inactive: int, per_prompt: int, rng: np.random.Generator) -> list[np.ndarray]:
  """A deterministic shuffle of example slots, cut into prompts of `per_prompt`.

  Slot i < n_active is the i-th activating example, slot n_active + j the j-th non-activating one.
  """
  order = rng.permutation(n_active + n_inactive)
  return [order[i : i + per_prompt] for i in range(0, order.size, max(1, per_prompt))]


def balanced_accuracy(truth: Sequence[int], predicted: Sequence[int | None]) -> dict[str, Any]:
  """Mean of the true-positive and true-negative rates over the items with a prediction (None: failed).

  The score is None unless both classes have answered items (one rate alone is not a balanced accuracy).
  """
  truth_N, pred = np.asarray(truth, bool), list(predicted)
  answered = np.array([p is not None for p in pred], bool)
  pred_N = np.array([bool(p) if p is not None else False for p in pred], bool)
  positive, negative = truth_N & answered, ~truth_N & answered
  tpr = float(np.mean(pred_N[positive])) if positive.any() else None
  tnr = float(np.mean(~pred_N[negative])) if negative.any() else None
  return {
    'score': (tpr + tnr) / 2 if tpr is not None and tnr is not None else None,
    'tpr': tpr,
    'tnr': tnr,
    'n_active': int(positive.sum()),
    'n_inactive': int(negative.sum()),
    'n_failed': int((~answered).sum()),
  }
