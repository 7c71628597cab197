"""The paper's claims on a real trained LM: SmolLM2-135M activations from one cache, nine seeds and the ablations.

  python -m experiments.fetch smollm2 && python -m experiments.corpus
  python -m experiments.reproduce --suite=smollm2 --out=runs/reproduce_smollm2            # the cpu plan, ~2 h here
  python -m experiments.reproduce --suite=smollm2 --quick --out=/tmp/repro_smollm2        # the test suite's plan
  python -m experiments.reproduce --suite=smollm2 --scale=full --dataset=BIG.jsonl --out=...  # paper sizes

Layout of --out: cache/ (one activation cache of the three hookpoints, from one forward to the deepest),
runs/<name>/ (run folders: config, checkpoints, exported SAEs, alignment/), plan.json, timings.json, claims.json,
summary.json, report.md. A finished run or alignment is read back, a killed one resumes from its checkpoint.

The plan (written before the first run and not to be changed after a verdict; PLANS below holds the numbers):
- Hookpoints: layers.6.mlp (base, as the smollm2 preset), layers.3.mlp (early) and layers.20.mlp (late, two
  thirds of the 30 layers). The LM's cost grows with depth (about 14,000 layer-tokens/s on 2 cores), so the cache
  of 2^20 tokens to layer 20 is the suite's largest single cost (about 25 minutes).
- Base SAE: TopK, 2,304 latents (expansion 4), k=32, one pass over the 2^20 cached tokens in batches of 512
  tokens (one sequence), lr 2e-3, 50 warm-up steps. Chosen by a pilot on the older layers.6.mlp cache that
  looked only at the training FVU and at how far decoders moved from their init (RESULTS.md, "smollm2 suite
  pilot"): batch 512 at lr 2e-3 had the lowest FVU of five (batch, lr) settings at equal tokens. No sharing was
  computed in the pilot.
- a. Nine seeds (0-8) at the base: every pair, Fig. 1-3, Fig. 2's exact subset curve and its fits, the
  exactly-in-n counts, firing counts over 2^18 tokens (the cache's second pass) for Fig. 3 and claim g.
- b. Width 1,152 / 2,304 / 4,608 at k=32; c. k 16 / 32 / 64 at 2,304 latents; d. 2^18 / 2^19 / 2^20 tokens
  (prefixes of one data order: each shorter run's batches are the first ones of the longer run's). Two seeds
  (0, 1) each; the base value of each is the base run's seed0-seed1 pair (same seeds, same data).
- e. ReLU+L1 and Gated against TopK at 2^19 tokens (half the base, for CPU time; TopK's pair is run d's), with
  TopK's lr. The L1 coefficient is calibrated on one seed's L0 alone (claims.calibrate_l1_coefficient, start 3,
  at most 8 runs, within 10% of TopK's L0), then two seeds are trained at it; the verdict needs their L0 within
  25% of TopK's. Added with issue 15, after the cpu plan's run: Matryoshka BatchTopK (L0 k by construction, no
  calibration) trains beside them; its row is reported, not judged (the paper makes no claim about it).
- f. Two seeds at layers.3.mlp and at layers.20.mlp with the base settings.
- Verdicts: a trend (b, c, d) holds when Spearman(value, shared fraction) has the paper's sign and |rho| >= 0.8;
  not tested when no value shares 1% of its latents. e holds when both L1 architectures share more than TopK.
  f (early): layers.3 shares less than layers.6; f (late): |shared(layers.20) - shared(layers.6)| <= 0.05, the
  paper's "almost constant across the middle layers"; both not tested when neither layer shares 1%. g holds at
  Spearman(firing count, seeds sharing) > 0.2. Fig. 2 holds when a power law with offset beats one without on AIC.
  Threshold 0.7, the paper rule, everywhere. Bimodality: Sarle's coefficient of the seed0-seed1 decoder cosines.
The quick plan shrinks every number (layers 1-3, 576 latents, 8K tokens, four seeds) and draws the base run's
figures only; the full plan is the
paper's sizes (32K latents, k=32, 100M tokens; a cache of 3 x 100M tokens takes 345 GB of bf16).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from experiments import suite_report
from saejax import storage
from saejax.analysis import claims, suite_runs
from saejax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Plan:
  name: str
  early: str
  base: str
  late: str
  cache_tokens: int
  cache_batch: int  # tokens per LM forward while caching
  context_length: int
  num_latents: int
  k: int
  batch_size: int
  lr: float | None
  warmup_steps: int
  num_tokens: int
  num_seeds: int
  widths: tuple[int, ...]
  ks: tuple[int, ...]
  token_values: tuple[int, ...]
  arch_tokens: int
  max_calibration_runs: int
  firing_tokens: int
  eval_tokens: int  # held-out CE/KL/FVU of the base run
  ablation_eval_tokens: int  # the same for every other run with two seeds (0: training metrics only)
  dead_tokens: int
  log_every: int
  checkpoint_every: int
  threshold: float = 0.7
  min_shared: float = 0.01  # below it at every value of an ablation, the ablation is not tested
  layer_tolerance: float = 0.05  # f (late): "almost constant" means within this much of the base layer
  # Fig. 1, A1, A2, stability (and Fig. 2) for every run's alignment, or for the base run's only. Presentation,
  # not measurement: a folder made either way passes the plan check (suite_report.check_plan).
  ablation_figures: bool = dataclasses.field(default=True, metadata={'presentation': True})

  def check(self) -> None:
    for name, values, base in (
      ('widths', self.widths, self.num_latents),
      ('ks', self.ks, self.k),
      ('token_values', self.token_values, self.num_tokens),
    ):
      if base not in values:
        raise ValueError(f'plan {self.name}: {name} {values} must include the base value {base}')
    if self.arch_tokens not in self.token_values:
      raise ValueError(f'plan {self.name}: arch_tokens must be one of token_values (TopK is that run)')


_LAYERS = dict(early='layers.3.mlp', base='layers.6.mlp', late='layers.20.mlp')
PLANS = {
  'cpu': Plan(
    'cpu',
    **_LAYERS,
    cache_tokens=2**20,
    cache_batch=2048,
    context_length=512,
    num_latents=2304,
    k=32,
    batch_size=512,
    lr=2e-3,
    warmup_steps=50,
    num_tokens=2**20,
    num_seeds=9,
    widths=(1152, 2304, 4608),
    ks=(16, 32, 64),
    token_values=(2**18, 2**19, 2**20),
    arch_tokens=2**19,
    max_calibration_runs=8,
    firing_tokens=2**18,
    eval_tokens=8192,
    ablation_eval_tokens=8192,
    dead_tokens=2**18,
    log_every=16,
    checkpoint_every=512,
  ),
  'quick': Plan(
    'quick',
    early='layers.1.mlp',
    base='layers.2.mlp',
    late='layers.3.mlp',
    cache_tokens=2**14,
    cache_batch=1024,
    context_length=128,
    num_latents=576,
    k=16,
    batch_size=256,
    lr=2e-3,
    warmup_steps=5,
    num_tokens=2**13,
    num_seeds=4,
    widths=(288, 576, 1152),
    ks=(8, 16, 32),
    token_values=(2**11, 2**12, 2**13),
    arch_tokens=2**12,
    max_calibration_runs=2,
    firing_tokens=2**11,
    eval_tokens=256,
    ablation_eval_tokens=0,
    dead_tokens=2**12,
    log_every=2,
    checkpoint_every=16,
    ablation_figures=False,  # 40 of the suite's 50 PNGs, a sixth of its time
  ),
  'full': Plan(
    'full',
    **_LAYERS,
    cache_tokens=100_007_936,  # 100M rounded up to whole 65,536-token batches
    cache_batch=32 * 2048,
    context_length=2048,
    num_latents=32768,
    k=32,
    batch_size=32 * 2048,
    lr=None,  # the recipe's 2e-4 / sqrt(num_latents / 2^14)
    warmup_steps=1000,
    num_tokens=100_007_936,
    num_seeds=9,
    widths=(16384, 32768, 65536),
    ks=(16, 32, 64),
    token_values=(25_001_984, 50_003_968, 100_007_936),
    arch_tokens=50_003_968,
    max_calibration_runs=8,
    firing_tokens=10_027_008,
    eval_tokens=1_048_576,
    ablation_eval_tokens=1_048_576,
    dead_tokens=10_000_000,
    log_every=100,
    checkpoint_every=500,
  ),
}
for _plan in PLANS.values():
  _plan.check()


def cache_config(plan: Plan, dataset: str) -> TrainConfig:
  from experiments import presets

  return dataclasses.replace(
    presets.PRESETS['smollm2'](),
    dataset=dataset,
    hookpoint=','.join((plan.early, plan.base, plan.late)),
    context_length=plan.context_length,
    batch_size=plan.cache_batch,
  )


class Suite:
  """Trains, aligns and judges every run of one plan under `out`; each step is skipped once done."""

  def __init__(self, out: str, plan: Plan, dataset: str, eval_dataset: str):
    self.out, self.plan, self.dataset, self.eval_dataset = out, plan, dataset, eval_dataset
    self.cache_dir = storage.join(out, 'cache')
    self.timings = suite_runs.Timings.load(storage.join(out, 'timings.json'))
    self.runs: dict[str, dict] = {}  # name -> {'setting', 'seeds', 'alignment' summary, ...}

  def config(self, **overrides) -> TrainConfig:
    plan = self.plan
    fields = dict(
      source='cache',
      dataset=self.cache_dir,
      eval_dataset=self.eval_dataset,
      cache_epochs=2,  # the firing counts read past the training pass
      hookpoint=plan.base,
      context_length=plan.context_length,
      num_latents=plan.num_latents,
      k=plan.k,
      batch_size=plan.batch_size,
      lr=plan.lr,
      warmup_steps=plan.warmup_steps,
      num_tokens=plan.num_tokens,
      init_seeds=(0, 1),
      eval_tokens=plan.ablation_eval_tokens,
      dead_tokens=plan.dead_tokens,
      log_every=plan.log_every,
      checkpoint_every=plan.checkpoint_every,
    )
    fields.update(overrides)
    return dataclasses.replace(cache_config(plan, self.dataset), **fields)

  def build_cache(self) -> None:
    """Writes the cache of the three hookpoints (one forward to the deepest), or continues or checks it."""
    from saejax.data import cache_writer

    print(f'[suite] cache: {self.plan.cache_tokens:,} tokens of {cache_config(self.plan, self.dataset).hookpoint}')
    started = time.time()
    result = cache_writer.write_cache(cache_config(self.plan, self.dataset), self.cache_dir, self.plan.cache_tokens)
    if result['status'] != 'complete':
      self.timings.add('cache', time.time() - started)

  def run(self, name: str, setting: str, firing_tokens: int = 0, **overrides) -> dict:
    config = self.config(**overrides)
    workdir = storage.join(self.out, 'runs', name)
    print(f'[suite] {name}: {setting} ({len(config.init_seeds)} seeds, {config.num_tokens:,} tokens)', flush=True)
    summary = suite_runs.train(config, workdir, self.timings, f'train {name}')
    alignment = None
    if len(config.init_seeds) >= 2:
      figures = name == 'base' or self.plan.ablation_figures
      alignment = suite_runs.align(
        workdir, firing_tokens, self.plan.threshold, self.timings, f'align {name}', figures=figures
      )
    self.runs[name] = {'setting': setting, 'seeds': len(config.init_seeds), 'workdir': workdir}
    self.runs[name].update(train=summary, alignment=alignment)
    return self.runs[name]

  def shared(self, name: str, key: str = 'shared_fraction') -> float:
    """The seed0-seed1 pair's value: the same pair in every run, so the ablations compare like with like."""
    pair = self.runs[name]['alignment']['pairs'][0]
    assert (pair['a'], pair['b']) == ('seed0', 'seed1'), pair
    return float(pair[key])

  def trend(self, claim: str, field: str, values, prefix: str, expect_sign: int) -> claims.Claim:
    plan = self.plan
    base_value = {'num_latents': plan.num_latents, 'k': plan.k, 'num_tokens': plan.num_tokens}[field]
    names = []
    for value in values:
      if value == base_value:
        names.append('base')
        continue
      names.append(f'{prefix}{value}')
      self.run(names[-1], f'{field}={value}', **{field: value})
    fractions = [self.shared(name) for name in names]
    pw_mcc = ', '.join(f'{self.shared(name, "pw_mcc"):.3f}' for name in names)
    return claims.trend_claim(claim, field, values, fractions, expect_sign, plan.min_shared, f'; PW-MCC {pw_mcc}')

  def arch_comparison(self) -> claims.Claim:
    plan = self.plan
    topk_name = 'base' if plan.arch_tokens == plan.num_tokens else f'tokens{plan.arch_tokens}'
    topk_l0 = suite_runs.tail_l0(self.runs[topk_name]['workdir'])
    rows = {'topk': {'shared': self.shared(topk_name), 'l0': topk_l0}}
    calibrations = {}
    for arch in ('relu', 'gated'):

      def measure_l0(config: TrainConfig, arch=arch) -> float:
        name = f'calibrate_{arch}_{config.l1_coefficient:.6g}'
        self.run(name, f'{arch} calibration, L1 {config.l1_coefficient:.4g}', **self.arch_fields(config))
        return suite_runs.tail_l0(self.runs[name]['workdir'])

      start = self.config(arch=arch, num_tokens=plan.arch_tokens, init_seeds=(0,), eval_tokens=0)
      calibrations[arch] = claims.calibrate_l1_coefficient(start, topk_l0, measure_l0, plan.max_calibration_runs)
      name = f'arch_{arch}'
      coefficient = calibrations[arch].coefficient
      self.run(
        name, f'{arch}, L1 {coefficient:.4g}', arch=arch, l1_coefficient=coefficient, num_tokens=plan.arch_tokens
      )
      rows[arch] = {'shared': self.shared(name), 'l0': suite_runs.tail_l0(self.runs[name]['workdir'])}
    self.run(
      'arch_matryoshka', 'matryoshka (BatchTopK, nested prefixes)', arch='matryoshka', num_tokens=plan.arch_tokens
    )
    workdir = self.runs['arch_matryoshka']['workdir']
    rows['matryoshka'] = {'shared': self.shared('arch_matryoshka'), 'l0': suite_runs.tail_l0(workdir)}
    return claims.arch_claim(rows, calibrations)

  @staticmethod
  def arch_fields(config: TrainConfig) -> dict:
    names = ('arch', 'l1_coefficient', 'num_tokens', 'init_seeds', 'eval_tokens')
    return {name: getattr(config, name) for name in names}

  def layer_claims(self) -> list[claims.Claim]:
    plan = self.plan
    for hookpoint in (plan.early, plan.late):
      self.run(f'hookpoint_{hookpoint}', f'hookpoint={hookpoint}', hookpoint=hookpoint)
    base = self.shared('base')
    early, late = self.shared(f'hookpoint_{plan.early}'), self.shared(f'hookpoint_{plan.late}')
    untested = f'; neither layer shares {plan.min_shared:.0%} of its latents, so not tested'
    early_text = f'{plan.early}: {early:.3f}, {plan.base}: {base:.3f}'
    late_text = f'{plan.late}: {late:.3f}, {plan.base}: {base:.3f} (|difference| <= {plan.layer_tolerance})'
    early_holds = None if max(early, base) < plan.min_shared else bool(early < base)
    late_holds = None if max(late, base) < plan.min_shared else bool(abs(late - base) <= plan.layer_tolerance)
    return [
      claims.Claim(
        'an early layer shares less than a middle one',
        early_text + (untested if early_holds is None else ''),
        early_holds,
        {'early': early, 'base': base},
      ),
      claims.Claim(
        'sharing is about constant from the middle to the later layers',
        late_text + (untested if late_holds is None else ''),
        late_holds,
        {'late': late, 'base': base},
      ),
    ]

  def base_claims(self) -> list[claims.Claim]:
    import numpy as np

    from saejax.analysis import firing

    workdir = self.runs['base']['workdir']
    alignment = self.runs['base']['alignment']
    results = [claims.bimodality_claim(suite_runs.first_pair_npz(workdir)['dec_cos'])]
    counts = firing.load_counts(workdir)
    rows = suite_report.universality_rows(storage.join(workdir, 'alignment', 'universality.csv'), 'seed0')
    n_shared = np.array([int(row['n_shared']) for row in rows])
    seed0 = list(counts['seeds']).index('seed0')
    results.append(claims.frequency_claim(counts['counts'][seed0], n_shared, int(counts['tokens'])))
    curve = {int(k): v for k, v in alignment['seeds']['unique_fraction_by_k'].items()}
    results.append(claims.fits_claim(curve))
    return results

  def measure(self) -> list[claims.Claim]:
    plan = self.plan
    self.build_cache()
    seeds = tuple(range(plan.num_seeds))
    self.run('base', 'base', firing_tokens=plan.firing_tokens, init_seeds=seeds, eval_tokens=plan.eval_tokens)
    results = self.base_claims()
    results.append(self.trend('longer training -> more sharing', 'num_tokens', plan.token_values, 'tokens', +1))
    results.append(self.trend('more latents -> less sharing', 'num_latents', plan.widths, 'latents', -1))
    results.append(self.trend('larger k -> less sharing', 'k', plan.ks, 'k', -1))
    results += self.layer_claims()
    results.append(self.arch_comparison())
    return results


def main_suite(out: str, plan_name: str, dataset: str | None, eval_dataset: str | None) -> None:
  from experiments.cli import EXIT_FAILED, fail
  from saejax.data import corpus
  from saejax.train.trainer import NonFiniteError

  plan = PLANS[plan_name]
  dataset = dataset or str(corpus.train_file())
  eval_dataset = eval_dataset or str(corpus.heldout_file())
  for path in (dataset, eval_dataset):
    if not storage.exists(path):
      fail(f'no text at {path}; build the corpus with `python -m experiments.corpus` or pass --dataset/--eval_dataset')
  try:
    suite_report.check_plan(out, plan)
    suite = Suite(out, plan, dataset, eval_dataset)
    results = suite.measure()
  except suite_runs.SuiteInterruptedError as error:
    print(f'stopped: {error}', file=sys.stderr)
    sys.exit(3)
  except NonFiniteError as error:
    fail(str(error).splitlines()[0], EXIT_FAILED)
  except (ValueError, FileNotFoundError, OSError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  suite_report.write(out, plan, suite, results)
  for claim in results:
    print(f'{suite_report.VERDICTS[claim.holds]}: {claim.claim}: {claim.measured}')
