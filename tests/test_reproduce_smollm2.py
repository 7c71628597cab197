"""`experiments.reproduce --suite=smollm2 --quick` on the real SmolLM2 GGUF and English corpus: every claim gets
a verdict (the verdicts are data, not asserted), the consistency metrics are written, a rerun skips every finished
run, a killed suite continues to the same result, and bad input is one line with exit code 2."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import suite_report, suite_smollm2
from saejax.analysis import claims
from saejax.train import run_folder
from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = (
  'the matched-cosine distribution is bimodal',
  'frequently firing latents are shared more often',
  'unique-vs-seeds fits a power law with offset',
  'longer training -> more sharing',
  'more latents -> less sharing',
  'larger k -> less sharing',
  'an early layer shares less than a middle one',
  'sharing is about constant from the middle to the later layers',
  'ReLU+L1 and Gated are more stable than TopK',
)


def _suite(out, corpus, *extra, timeout=600) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  command = [
    sys.executable,
    '-m',
    'experiments.reproduce',
    '--suite=smollm2',
    '--quick',
    f'--out={out}',
    f'--dataset={corpus / "train.jsonl"}',
    f'--eval_dataset={corpus / "heldout.jsonl"}',
    *extra,
  ]
  return forkserver.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def quick(tmp_path_factory, english_corpus, smollm2_gguf):
  out = tmp_path_factory.mktemp('repro_smollm2')
  result = _suite(out, english_corpus)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


@pytest.mark.slow
def test_quick_suite_reports_every_claim_with_the_paper_value(quick):
  out, result = quick
  measured = json.loads((out / 'claims.json').read_text())
  names = [c['claim'] for c in measured]
  for claim in CLAIMS:
    assert sum(name.startswith(claim) for name in names) == 1, claim
  assert all(c['holds'] in (True, False, None) and c['measured'] and c['paper'] for c in measured)
  report = (out / 'report.md').read_text()
  assert report.split('## Claims')[1].split('##')[0].count('\n| ') == len(measured) + 1
  for label in ('shared fraction', 'partner agreement', 'PW-MCC', 'unique to the base SAE'):
    assert label in report
  arch = next(c for c in measured if c['claim'].startswith('ReLU+L1 and Gated'))
  assert 0.0 <= arch['details']['rows']['matryoshka']['shared'] <= 1.0 and 'matryoshka (beside' in arch['measured']
  # The console: one line per run and one per verdict, no library INFO logs.
  assert 'I1' not in result.stderr and 'checkpoint_manager' not in result.stderr
  assert result.stdout.count('[suite] ') >= len(suite_smollm2.PLANS['quick'].widths) + 8


@pytest.mark.slow
def test_quick_suite_writes_pw_mcc_stability_and_seed_stats(quick):
  out, _ = quick
  plan = suite_smollm2.PLANS['quick']
  base = out / 'runs' / 'base' / 'alignment'
  alignment = json.loads((base / 'summary.json').read_text())
  assert len(alignment['pairs']) == plan.num_seeds * (plan.num_seeds - 1) // 2
  for pair in alignment['pairs']:
    assert 0.0 <= pair['pw_mcc'] <= 1.0 and pair['pw_mcc'] == pytest.approx(pair['mean_cos_dec'])
  # The base run evaluates on held-out text: every per-seed metric, with its spread across the seeds.
  stats = alignment['seed_stats']
  assert set(stats) == set(run_folder.SEED_METRICS)
  assert all(s['std'] >= 0.0 for s in stats.values()) and stats['l0']['mean'] == pytest.approx(plan.k)
  train = json.loads((out / 'runs' / 'base' / 'summary.json').read_text())
  ce = [seed['ce_increase'] for seed in train['lm_eval']['seeds']]
  assert stats['ce_increase']['mean'] == pytest.approx(sum(ce) / len(ce))
  with open(base / 'universality.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert all(float(row['stability']) == pytest.approx(int(row['n_shared']) / (plan.num_seeds - 1)) for row in rows)
  stability = alignment['seeds']['stability']
  assert sum(stability['fraction_of_latents']) == pytest.approx(1.0)
  assert 'Per-latent stability' in (base / 'report.md').read_text() and (base / 'stability.png').is_file()
  # The quick plan draws the base run's figures only; an ablation's alignment has its numbers and no PNGs.
  ablation = out / 'runs' / f'k{plan.ks[0]}' / 'alignment'
  assert json.loads((ablation / 'summary.json').read_text())['figures'] == {}
  assert (ablation / 'universality.csv').is_file() and not list(ablation.glob('*.png'))
  summary = json.loads((out / 'summary.json').read_text())
  assert {row['run'] for row in summary['runs']} >= {'base', f'k{plan.ks[0]}', 'arch_relu', 'arch_gated'}
  assert summary['machine']['cpu'] and summary['versions']['jax']


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_a_killed_suite_continues_to_the_same_claims(quick, english_corpus):
  out, _ = quick
  plan = suite_smollm2.PLANS['quick']
  before = json.loads((out / 'claims.json').read_text())
  timings = (out / 'timings.json').read_text()
  again = _suite(out, english_corpus)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (out / 'timings.json').read_text() == timings  # nothing was trained, cached or aligned again
  assert json.loads((out / 'claims.json').read_text()) == before
  # A kill: one run gone whole, another stopped after its last checkpoint, before export and alignment.
  shutil.rmtree(out / 'runs' / f'k{plan.ks[0]}')
  stopped = out / 'runs' / f'k{plan.ks[-1]}'
  for name in ('summary.json', 'alignment', 'saes', 'saelens'):
    path = stopped / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  resumed = _suite(out, english_corpus)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert json.loads((out / 'claims.json').read_text()) == before
  assert json.loads((out / 'timings.json').read_text()).keys() == json.loads(timings).keys()


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(quick, english_corpus, tmp_path):
  out, _ = quick
  missing = forkserver.run(
    [sys.executable, '-m', 'experiments.reproduce', '--suite=smollm2', '--quick', f'--out={tmp_path}',
     f'--dataset={tmp_path / "nothing.jsonl"}'],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert missing.returncode == 2 and missing.stderr.count('\n') == 1 and 'experiments.corpus' in missing.stderr
  # A folder made with another plan is refused, and nothing in it is touched.
  plan_file = out / 'plan.json'
  original = plan_file.read_text()
  plan_file.write_text(original.replace('"num_seeds": 4', '"num_seeds": 5'))
  try:
    refused = _suite(out, english_corpus)
    assert refused.returncode == 2 and refused.stderr.strip().count('\n') == 0
    assert 'another plan' in refused.stderr and 'num_seeds' in refused.stderr
  finally:
    plan_file.write_text(original)


def test_every_plan_includes_its_base_values_and_the_cpu_plan_is_the_documented_one():
  cpu = suite_smollm2.PLANS['cpu']
  assert (cpu.early, cpu.base, cpu.late) == ('layers.3.mlp', 'layers.6.mlp', 'layers.20.mlp')
  assert (cpu.num_latents, cpu.k, cpu.num_seeds, cpu.num_tokens) == (2304, 32, 9, 2**20)
  assert cpu.num_tokens <= cpu.cache_tokens and cpu.arch_tokens in cpu.token_values
  full = suite_smollm2.PLANS['full']
  assert full.num_latents == 32768 and full.k == 32 and full.num_tokens >= 100_000_000
  broken = suite_smollm2.dataclasses.replace(cpu, widths=(1152, 4608))
  with pytest.raises(ValueError, match='must include the base value 2304'):
    broken.check()


def test_a_plan_folder_accepts_other_figure_choices_but_not_other_numbers(tmp_path):
  quick = suite_smollm2.PLANS['quick']
  suite_report.check_plan(str(tmp_path), quick)
  suite_report.check_plan(str(tmp_path), dataclasses.replace(quick, ablation_figures=True))  # presentation only
  with pytest.raises(ValueError, match='another plan .*num_seeds'):
    suite_report.check_plan(str(tmp_path), dataclasses.replace(quick, num_seeds=5))
  assert json.loads((tmp_path / 'plan.json').read_text())['ablation_figures'] is False  # the first plan's file


def test_trend_is_not_tested_where_nothing_is_shared():
  flat = claims.trend_claim('more latents -> less sharing', 'num_latents', [1, 2, 3], [0.002, 0.001, 0.0], -1, 0.01)
  assert flat.holds is None and 'no setting shares 1%' in flat.measured
  falling = claims.trend_claim('more latents -> less sharing', 'num_latents', [1, 2, 3], [0.3, 0.2, 0.1], -1, 0.01)
  assert falling.holds is True and falling.details['spearman'] == pytest.approx(-1.0)
  rising = claims.trend_claim('more latents -> less sharing', 'num_latents', [1, 2, 3], [0.1, 0.2, 0.3], -1, 0.01)
  assert rising.holds is False


def test_seed_stats_prefer_held_out_metrics():
  section = {
    'final': {'fvu': [0.5, 0.7], 'l0': [32.0, 32.0], 'dead_fraction': [0.0, 0.1]},
    'lm_eval': {'seeds': [{'fvu': 0.2, 'l0': 32.0, 'dead_fraction': 0.0, 'ce_increase': 0.1, 'kl': 0.3},
                          {'fvu': 0.4, 'l0': 32.0, 'dead_fraction': 0.0, 'ce_increase': 0.3, 'kl': 0.5}]},
  }  # fmt: skip
  stats = run_folder.seed_stats(run_folder.per_seed_metrics(section))
  assert stats['fvu'] == pytest.approx({'mean': 0.3, 'std': 0.1})
  assert stats['ce_increase'] == pytest.approx({'mean': 0.2, 'std': 0.1})
  del section['lm_eval']
  stats = run_folder.seed_stats(run_folder.per_seed_metrics(section))
  assert set(stats) == {'fvu', 'l0', 'dead_fraction'} and stats['fvu'] == pytest.approx({'mean': 0.6, 'std': 0.1})


@pytest.mark.parametrize('name', sorted(suite_smollm2.PLANS))
def test_every_run_config_of_every_plan_is_valid(name, tmp_path):
  plan = suite_smollm2.PLANS[name]
  suite = suite_smollm2.Suite(str(tmp_path), plan, 'train.jsonl', 'heldout.jsonl')
  base = suite.config(init_seeds=tuple(range(plan.num_seeds)))
  base.validate()
  assert base.num_steps * base.batch_size == plan.num_tokens and base.hookpoints == [plan.base]
  for field, values in (('num_latents', plan.widths), ('k', plan.ks), ('num_tokens', plan.token_values)):
    for value in values:
      suite.config(**{field: value}).validate()
  for arch in ('relu', 'gated'):
    suite.config(arch=arch, num_tokens=plan.arch_tokens, init_seeds=(0,)).validate()
  assert suite_smollm2.cache_config(plan, 'train.jsonl').hookpoints == [plan.early, plan.base, plan.late]
