"""What a GPU or TPU would run, checked on CPU: the paper-size step and LM forward exported with `jax.export`.

Nothing here runs on an accelerator; the modules are lowered for `cuda` and `tpu` from abstract shapes and read.
"""

import dataclasses

import jax
import pytest

from saejax import tuning
from saejax.config import TrainConfig
from saejax.models import shapes
from saejax.train import export

PAPER_BATCH = 32 * 2049
PAPER_STEP = TrainConfig(
  source='synthetic',
  d_in=768,
  num_latents=32768,
  k=32,
  batch_size=PAPER_BATCH,
  num_tokens=PAPER_BATCH * 4000,
  init_seeds=tuple(range(9)),
)


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_paper_step_on_accelerators_has_no_loop_that_grows_with_the_batch(platform):
  counts = export.while_loop_trip_counts(export.export_train_step(PAPER_STEP, platform))
  doubled = export.while_loop_trip_counts(
    export.export_train_step(dataclasses.replace(PAPER_STEP, batch_size=2 * PAPER_BATCH), platform)
  )
  assert counts == doubled
  assert all(0 < count <= 16 for count in counts), counts  # a few large blocks or seed groups, never 2,049 chunks


def test_the_loop_count_reader_sees_the_cpu_token_chunks():
  # CPU keeps its 32-token chunks: 2,049 iterations at the paper's batch, twice that at double the batch.
  counts = export.while_loop_trip_counts(export.export_train_step(PAPER_STEP, 'cpu'))
  assert PAPER_BATCH // tuning.CPU_KERNEL_CHUNK_TOKENS in counts
  doubled = export.while_loop_trip_counts(
    export.export_train_step(dataclasses.replace(PAPER_STEP, batch_size=2 * PAPER_BATCH), 'cpu')
  )
  assert 2 * PAPER_BATCH // tuning.CPU_KERNEL_CHUNK_TOKENS in doubled


@pytest.mark.parametrize('topk_kernel', ['sparse', 'dense'])
@pytest.mark.parametrize('sae_dtype,operand', [('bfloat16', 'bf16'), ('float32', 'f32')])
def test_encoder_dot_takes_the_sae_dtype(topk_kernel, sae_dtype, operand):
  config = dataclasses.replace(PAPER_STEP, sae_dtype=sae_dtype, topk_kernel=topk_kernel)
  dots = export.operand_types(export.export_train_step(config, 'cuda'), 'stablehlo.dot_general')
  encoder = f'tensor<1x{PAPER_BATCH}x768x{operand}>, tensor<1x32768x768x{operand}>'
  assert encoder in dots, dots


def test_accelerators_default_to_bf16_sae_matmuls_and_cpu_to_float32():
  assert PAPER_STEP.resolved_kernel_plan('gpu')['sae_dtype'] == 'bfloat16'
  assert PAPER_STEP.resolved_kernel_plan('tpu')['sae_dtype'] == 'bfloat16'
  assert PAPER_STEP.resolved_kernel_plan('cpu')['sae_dtype'] == 'float32'


def _attention_scores_f32(exported, seq=2049):
  """Every fp32 tensor whose last two dims are [T, T] (queries x keys)."""
  return [t for t in export.tensor_types(exported) if t.endswith(f'x{seq}x{seq}xf32>')]


@pytest.mark.parametrize('model', ['pythia-160m', 'smollm2-135m'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_lm_forward_never_holds_fp32_attention_scores(model, platform):
  exported = export.export_lm_forward(shapes.PRESETS[model], platform, batch=32, seq=2049)
  assert _attention_scores_f32(exported) == []


def test_the_scores_check_finds_dense_attention():
  exported = export.export_lm_forward(shapes.PRESETS['pythia-160m'], 'cuda', batch=32, seq=2049, attention='dense')
  assert 'tensor<32x12x1x2049x2049xf32>' in _attention_scores_f32(exported)


@pytest.fixture
def cudnn_as_on_a_hopper_gpu(monkeypatch):
  """jax asks the local GPU for cuDNN's version and compute capability; answer as an H200 with cuDNN 9.10 would."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

  monkeypatch.setattr(cudnn_attention, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(cudnn_attention, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(cudnn_attention, 'is_cuda_compute_capability_equal', lambda capability: False)


@pytest.mark.parametrize('model', ['pythia-160m', 'smollm2-135m'])
def test_cuda_forward_uses_cudnn_flash_attention(cudnn_as_on_a_hopper_gpu, model):
  cfg = shapes.PRESETS[model]
  attention = tuning.lm_attention('gpu', 'bfloat16', cfg.head_dim, cudnn=True)
  assert attention == 'cudnn'
  exported = export.export_lm_forward(cfg, 'cuda', batch=32, seq=2049, attention=attention)
  assert export.custom_calls(exported).count('__cudnn$fmhaSoftmax') == cfg.num_layers
  assert not [t for t in export.tensor_types(exported) if 'x2049x2049x' in t]


def test_fp32_models_on_gpu_fall_back_from_cudnn():
  assert tuning.lm_attention('gpu', 'float32', 64, cudnn=None) == 'chunked'
  assert tuning.lm_attention('cpu', 'bfloat16', 64) == 'chunked'
  assert not tuning.cudnn_attention_usable('bfloat16', 64) or jax.default_backend() == 'gpu'
