"""Explain and score the latents of an aligned LM run with an LLM (paper section 5: Fig. 6, Table 1).

  python -m experiments.interpret --workdir=RUN --base_url=http://localhost:8000/v1 --model=NAME
      [--seeds=0,1] [--latents=100 | --latents=all] [--tokens=1000000] [--max_concurrency=8]

Needs `RUN/alignment/` (python -m experiments.align --workdir=RUN). The API key comes from --api_key or the
environment (OPENAI_API_KEY); it is never logged or written. Writes RUN/interpret/: contexts_<seed>.npz,
scores_<seed>.jsonl (one line per finished latent; a rerun skips them), cache/ (the client's answers),
fig6_left_scores_by_sharing.png, fig6_right_matched_scores.png, report.md.
Exit codes: 0 done, 1 some latents failed on server errors (rerun to retry them), 2 bad input (one line).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse

import numpy as np
from absl import app, flags

from experiments.cli import fail, parse_flags
from saejax import console, storage
from saejax.train import run_folder

_WORKDIR = flags.DEFINE_string('workdir', None, 'An aligned LM training run folder.')
_BASE_URL = flags.DEFINE_string('base_url', None, 'OpenAI-compatible server, e.g. http://localhost:8000/v1.')
_MODEL = flags.DEFINE_string('model', None, 'Model name sent to the server.')
_API_KEY = flags.DEFINE_string('api_key', None, 'API key (default: the OPENAI_API_KEY environment variable).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds to interpret; the first two form the Fig. 6 pairs.')
_LATENTS = flags.DEFINE_string('latents', '100', "Latents per alignment bin (first seed, plus partners) or 'all'.")
_TOKENS = flags.DEFINE_integer('tokens', 1_000_000, 'Held-out tokens to collect contexts from.')
_WINDOW = flags.DEFINE_integer('window', 32, 'Tokens per context window.')
_EXPLAIN_EXAMPLES = flags.DEFINE_integer('explain_examples', 20, 'Top windows shown to the explainer.')
_DETECT = flags.DEFINE_integer('detect_examples', 100, 'Activating and (as many) non-activating windows scored.')
_PER_PROMPT = flags.DEFINE_integer('per_prompt', 10, 'Detection examples per prompt.')
_MARKS = flags.DEFINE_bool('detection_marks', False, 'Self-test: mark activating tokens in detection prompts.')
_HOOKPOINT = flags.DEFINE_string('hookpoint', None, 'Which hookpoint of the run (default: the only one).')
_MAX_CONCURRENCY = flags.DEFINE_integer('max_concurrency', 8, 'Requests in flight at once.')
_MAX_RETRIES = flags.DEFINE_integer('max_retries', 5, 'Retries per request on 429/5xx/timeouts.')
_TIMEOUT = flags.DEFINE_float('timeout_s', 60.0, 'Seconds per request.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', None, 'Answer cache (default RUN/interpret/cache).')
_SAMPLE_SEED = flags.DEFINE_integer('sample_seed', 0, 'Seed of the latent sample, window sampling and shuffles.')


def check_reachable(base_url: str, timeout_s: float = 5.0) -> None:
  """Raises ConnectionError with a one-line message when nothing listens at the server's host and port."""
  parts = urllib.parse.urlparse(base_url)
  if parts.scheme not in ('http', 'https') or not parts.hostname:
    raise ValueError(f'--base_url={base_url!r} is not an http(s) URL, e.g. http://localhost:8000/v1')
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  try:
    socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
  except OSError as error:
    raise ConnectionError(
      f'cannot reach the server at {parts.hostname}:{port} ({error.strerror or error}); start it or fix --base_url'
    ) from None


def choose_latents(run: str, seeds: list[str], spec: str, sample_seed: int, sizes: dict[str, int]):
  """{seed: sorted latents}: all, or per alignment bin of the first seed plus the partners in the second."""
  from saejax.interpret import analysis

  if spec == 'all':
    return {seed: np.arange(sizes[seed], dtype=np.int64) for seed in seeds}
  per_bin = int(spec)
  if per_bin <= 0:
    raise ValueError(f"--latents must be a positive count per alignment bin or 'all', got {spec}")
  chosen = {}
  partner, cos = analysis.pair_alignment(storage.join(run, 'alignment'), seeds[0], seeds[1 % len(seeds)])
  first = analysis.sample_per_bin(cos, per_bin, sample_seed)
  chosen[seeds[0]] = first
  for seed in seeds[1:]:
    partner, _ = analysis.pair_alignment(storage.join(run, 'alignment'), seeds[0], seed)
    chosen[seed] = np.unique(partner[first][partner[first] >= 0])
  return chosen


def main(argv: list[str]) -> None:
  if argv[1:]:
    fail(f'unexpected arguments {argv[1:]}')
  for flag, name in ((_WORKDIR, 'workdir'), (_BASE_URL, 'base_url'), (_MODEL, 'model')):
    if not flag.value:
      fail(f'--{name} is required')
  run = _WORKDIR.value
  try:
    interpret(run)
  except (ValueError, OSError) as error:  # OSError: unreadable files, unreachable server or bucket
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def interpret(run: str) -> None:
  from saejax import formats
  from saejax.config import TrainConfig
  from saejax.interpret import analysis, contexts, pipeline

  config = TrainConfig.from_json(run_folder.read_config(run))
  if config.variants:
    raise ValueError(
      f'{run} trained variants ({config.variants}); interpretation reads one setting per run folder, so train the '
      f'variant to interpret as a run of its own (bitwise the same SAEs on CPU)'
    )
  if not storage.isfile(storage.join(run, 'alignment', 'universality.csv')):
    raise FileNotFoundError(f'{run} is not aligned yet; run python -m experiments.align --workdir={run} first')
  if config.source != 'lm':
    raise ValueError(f'{run} was trained on source={config.source!r}; interpretation needs an LM run')
  hookpoint, sae_dirs = run_folder.exported_sae_dirs(run, _HOOKPOINT.value)
  seeds = [s if s.startswith('seed') else f'seed{s}' for s in _SEEDS.value]
  missing = [s for s in seeds if s not in sae_dirs]
  if missing or not seeds:
    raise ValueError(f'--seeds names {missing or "nothing"}; the run has {sorted(sae_dirs)}')
  if _LATENTS.value != 'all' and len(seeds) < 2:
    raise ValueError('--latents=N samples pairs of two seeds; pass two --seeds or --latents=all')
  if not _LATENTS.value == 'all' and not _LATENTS.value.isdigit():
    raise ValueError(f"--latents must be a count per alignment bin or 'all', got {_LATENTS.value!r}")
  loaded = {seed: formats.load_sae(sae_dirs[seed]) for seed in seeds}
  chosen = choose_latents(
    run, seeds, _LATENTS.value, _SAMPLE_SEED.value, {s: int(p['W_enc'].shape[0]) for s, (p, _) in loaded.items()}
  )
  scoring = pipeline.ScoringSettings(
    explain_examples=_EXPLAIN_EXAMPLES.value,
    detect_active=_DETECT.value,
    detect_inactive=_DETECT.value,
    per_prompt=_PER_PROMPT.value,
    marks=_MARKS.value,
    seed=_SAMPLE_SEED.value,
  )
  settings = contexts.ContextSettings(
    num_tokens=_TOKENS.value,
    window=_WINDOW.value,
    top_k=_EXPLAIN_EXAMPLES.value,
    num_random=_DETECT.value + _EXPLAIN_EXAMPLES.value,
    seed=_SAMPLE_SEED.value,
  )
  settings_id = scoring.settings_id(_MODEL.value)
  todo = {
    seed: [
      int(x)
      for x in chosen[seed]
      if int(x) not in pipeline.finished_latents(pipeline.scores_path(run, seed), settings_id)
    ]
    for seed in seeds
  }
  failed = 0
  if any(todo.values()):
    check_reachable(_BASE_URL.value)
    stored = _contexts(run, config, hookpoint, seeds, loaded, chosen, settings)
    from saejax.interpret.client import ChatClient

    client = ChatClient(
      _BASE_URL.value,
      _MODEL.value,
      api_key=_API_KEY.value,
      max_concurrency=_MAX_CONCURRENCY.value,
      max_retries=_MAX_RETRIES.value,
      timeout_s=_TIMEOUT.value,
      cache_dir=_CACHE_DIR.value or storage.join(run, 'interpret', 'cache'),
    )
    decode = contexts.TokenText(os.path.join(stored['model_path'], 'tokenizer.json'))
    for seed in seeds:
      counts = pipeline.score_latents(
        stored[seed],
        todo[seed],
        client,
        decode,
        scoring,
        pipeline.scores_path(run, seed),
        seed,
        chunk=max(8, 4 * _MAX_CONCURRENCY.value),
      )
      console.say(f'seed {seed}: {counts}')
      failed += counts['failed']
  tables = {seed: analysis.score_table(pipeline.read_scores(pipeline.scores_path(run, seed))) for seed in seeds}
  report = analysis.write_report(run, seeds, tables, storage.join(run, 'interpret'))
  console.say(f'report: {storage.join(run, "interpret", "report.md")} ({report["by_count"]})')
  if failed:
    print(f'error: {failed} latents failed on server errors and were not scored; rerun to retry them', file=sys.stderr)
    sys.exit(1)


def _contexts(run, config, hookpoint, seeds, loaded, chosen, settings) -> dict:
  """Stored contexts per seed, collected (and saved) where missing or collected with other settings."""
  from saejax import data
  from saejax import sae as sae_lib
  from saejax import sharding as shd
  from saejax.interpret import contexts

  out, source = {}, None
  for seed in seeds:
    path = contexts.contexts_path(run, seed)
    stored = contexts.load_contexts(path) if storage.exists(path) else None
    if stored is None or not contexts.matches(stored, chosen[seed], settings, hookpoint):
      if source is None:
        source = data.make_source(config, shd.batch_sharding(shd.make_mesh()))
      params, cfg = loaded[seed]
      spec = sae_lib.SaeSpec(arch=cfg['arch'], d_in=cfg['d_in'], num_latents=cfg['num_latents'], k=cfg['k'])
      stored = contexts.collect_contexts(
        params,
        spec,
        source,
        chosen[seed],
        settings,
        config.num_steps,
        hookpoint_index=config.hookpoints.index(hookpoint),
      )
      stored.meta.update(hookpoint=hookpoint, model_path=source.model.path)
      contexts.save_contexts(path, stored)
    out[seed] = stored
  out['model_path'] = next(out[s] for s in seeds).meta['model_path']
  return out


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
