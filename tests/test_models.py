"""saejax.models against transformers on tiny random checkpoints of each family, plus loader behaviour.

The reference models are made "loud" (norm weights and biases moved off 1 / 0, linear weights x8) so that
pre-activations are O(1) and every architecture detail (GELU form, rotary layout, fused-qkv interleave,
residual order) shows at fp32 tolerance. Everything is built offline in temp folders in a few seconds.
"""

import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import models
from saejax.sharding import make_mesh

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, T, B = 96, 12, 2
HOOK_LAYERS = (0, 2)

CONFIGS = {
  'neox_parallel': lambda: transformers.GPTNeoXConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    rotary_pct=0.25,
    use_parallel_residual=True,
    max_position_embeddings=64,
  ),
  'neox_sequential': lambda: transformers.GPTNeoXConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    rotary_pct=0.5,
    rotary_emb_base=500.0,
    use_parallel_residual=False,
    max_position_embeddings=64,
  ),
  'gpt2': lambda: transformers.GPT2Config(
    vocab_size=VOCAB,
    n_embd=64,
    n_layer=3,
    n_head=4,
    n_positions=64,
    bos_token_id=VOCAB - 1,
    eos_token_id=VOCAB - 1,
  ),
  'llama_gqa_untied': lambda: transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    intermediate_size=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=64,
  ),
  # llama3 scaling with a short original context, so every band (kept, smoothed, divided) is exercised.
  'llama3_tied': lambda: transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=128,
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=64,
    rope_parameters={
      'rope_type': 'llama3',
      'rope_theta': 500000.0,
      'factor': 8.0,
      'low_freq_factor': 1.0,
      'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16,
    },
  ),
}
MODEL_CLASSES = {'neox': 'GPTNeoXForCausalLM', 'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}


def _build(name: str, seed: int = 0):
  torch.manual_seed(seed)
  cls = getattr(transformers, MODEL_CLASSES[name.split('_')[0].replace('llama3', 'llama')])
  model = cls(CONFIGS[name]()).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    norms = {id(m) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) or 'RMSNorm' in type(m).__name__}
    for module in model.modules():
      for pname, p in module.named_parameters(recurse=False):
        noise = torch.randn(p.shape, generator=gen)
        if id(module) in norms:
          p.copy_((1.0 + 0.3 * noise) if pname == 'weight' else 0.3 * noise)
        elif pname == 'bias':
          p.copy_(0.3 * noise)
        else:
          p.mul_(8.0)
  return model


def _tokens(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T)).astype(np.int32)


def _modules(model, layer: int) -> dict:
  """The torch modules whose outputs are `layers.N`, `layers.N.attn` and `layers.N.mlp`."""
  if hasattr(model, 'gpt_neox'):
    block = model.gpt_neox.layers[layer]
    return {'': block, '.attn': block.attention, '.mlp': block.mlp}
  if hasattr(model, 'transformer'):
    block = model.transformer.h[layer]
    return {'': block, '.attn': block.attn, '.mlp': block.mlp}
  block = model.model.layers[layer]
  return {'': block, '.attn': block.self_attn, '.mlp': block.mlp}


def _reference(model, tokens: np.ndarray, layers=HOOK_LAYERS, edit=None):
  """({hookpoint: activation}, logits) from torch; `edit` = (hookpoint, fn) rewrites one module output."""
  acts, handles = {}, []
  for layer in layers:
    for suffix, module in _modules(model, layer).items():
      name = f'layers.{layer}{suffix}'

      def hook(_module, _inputs, out, name=name):
        main = out[0] if isinstance(out, tuple) else out
        if edit is not None and edit[0] == name:
          main = edit[1](main)
          out = (main, *out[1:]) if isinstance(out, tuple) else main
        acts[name] = main.detach().float().numpy().copy()
        return out

      handles.append(module.register_forward_hook(hook))
  try:
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  finally:
    for handle in handles:
      handle.remove()
  return acts, logits


def assert_close(actual, expected, rtol=1e-5, what=''):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
  assert err <= rtol * scale, f'{what}: max abs err {err:.3g} > {rtol:g} x max |ref| {scale:.3g}'


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """name -> (torch model, folder it was saved to); built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      model = _build(name)
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder)
      cache[name] = (model, folder)
    return cache[name]

  return get


@pytest.mark.parametrize('name', list(CONFIGS))
def test_hookpoints_and_logits_match_transformers(saved, name):
  torch_model, folder = saved(name)
  tokens = _tokens()
  ref_acts, ref_logits = _reference(torch_model, tokens)
  model = models.load_pretrained(folder, dtype=jnp.float32)
  assert model.config.num_layers == 3 and model.d_model == 64 and model.config.vocab_size == VOCAB
  acts = model.activations(tokens, hookpoints=list(ref_acts))
  for hook, ref in ref_acts.items():
    assert acts[hook].shape == (B, T, 64) and acts[hook].dtype == jnp.float32
    assert_close(acts[hook], ref, what=f'{name} {hook}')
  logits = model.logits(tokens)
  assert logits.dtype == jnp.float32
  assert_close(logits, ref_logits, what=f'{name} logits')


def test_hub_config_spellings_read_like_transformers5():
  hub_neox = {
    'model_type': 'gpt_neox',
    'vocab_size': 50304,
    'hidden_size': 768,
    'num_hidden_layers': 12,
    'num_attention_heads': 12,
    'intermediate_size': 3072,
    'rotary_pct': 0.25,
    'rotary_emb_base': 10000,
  }
  v5_neox = {
    **{k: v for k, v in hub_neox.items() if not k.startswith('rotary')},
    'rope_parameters': {'partial_rotary_factor': 0.25, 'rope_theta': 10000.0, 'rope_type': 'default'},
  }
  assert models.from_hf_config(hub_neox) == models.from_hf_config(v5_neox)
  assert models.from_hf_config(hub_neox).rope.dim == 16
  scaling = {'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
  base = {
    'model_type': 'llama',
    'vocab_size': 128256,
    'hidden_size': 2048,
    'num_hidden_layers': 16,
    'num_attention_heads': 32,
    'num_key_value_heads': 8,
    'intermediate_size': 8192,
    'max_position_embeddings': 131072,
  }
  hub_llama = {**base, 'rope_theta': 500000.0, 'rope_scaling': {**scaling, 'rope_type': 'llama3'}}
  v5_llama = {**base, 'rope_parameters': {**scaling, 'rope_type': 'llama3', 'rope_theta': 500000.0}}
  assert models.from_hf_config(hub_llama) == models.from_hf_config(v5_llama)
  assert models.from_hf_config(hub_llama).rope.rope_type == 'llama3'
  with pytest.raises(ValueError, match='gpt_neox, gpt2, llama'):
    models.from_hf_config({'model_type': 'bert', 'architectures': ['BertModel']})


def test_parse_hookpoint():
  assert models.parse_hookpoint('layers.6.mlp') == (6, 'mlp')
  assert models.parse_hookpoint('layers.0.attn') == (0, 'attn')
  assert models.parse_hookpoint('layers.11', num_layers=12) == (11, 'resid')
  for bad in ('layer.6.mlp', 'layers.6.mlp_out', 'blocks.6.hook_mlp_out', 'layers.x', 'layers.6.'):
    with pytest.raises(ValueError, match='bad hookpoint') as info:
      models.parse_hookpoint(bad)
    assert '\n' not in str(info.value)
  with pytest.raises(ValueError, match='out of range.*12 layers'):
    models.parse_hookpoint('layers.12.mlp', num_layers=12)


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
  torch_model, folder = saved('llama_gqa_untied')
  torch_model.save_pretrained(tmp_path, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file() and len(list(tmp_path.glob('*.safetensors'))) > 2
  whole = models.load_pretrained(folder).params
  sharded = models.load_pretrained(tmp_path).params
  assert jax.tree.structure(whole) == jax.tree.structure(sharded)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('ckpt_dtype', ['float16', 'bfloat16'])
def test_half_precision_checkpoints(tmp_path, ckpt_dtype):
  torch_model = _build('neox_parallel', seed=5)
  torch_model.to(getattr(torch, ckpt_dtype)).save_pretrained(tmp_path)
  # The reference re-reads the file: `.to(fp32)` on the model in memory would keep its bf16-rounded rotary
  # inverse-frequency buffer, which a fresh load recomputes in fp32.
  reference = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens = _tokens(1)
  _, ref_logits = _reference(reference, tokens)
  upcast = models.load_pretrained(tmp_path, dtype=jnp.float32)
  assert_close(upcast.logits(tokens), ref_logits, what=f'{ckpt_dtype} checkpoint as fp32')
  half = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert half.params['layers'][0]['attn']['wq'].dtype == jnp.bfloat16
  assert half.activations(tokens, ['layers.1'])['layers.1'].dtype == jnp.bfloat16
  assert_close(half.logits(tokens), ref_logits, rtol=5e-2, what=f'{ckpt_dtype} checkpoint as bf16')


@pytest.mark.parametrize('name', ['neox_parallel', 'llama3_tied'])
def test_replace_splices_into_the_forward(saved, name):
  torch_model, folder = saved(name)
  model = models.load_pretrained(folder)
  tokens = _tokens(2)
  base = np.asarray(model.logits(tokens))
  assert_close(model.logits(tokens, replace={'layers.1.mlp': lambda x: x}), base, rtol=1e-6, what='identity')
  zeroed = np.asarray(model.logits(tokens, replace={'layers.1.mlp': jnp.zeros_like}))
  assert np.max(np.abs(zeroed - base)) > 1e-2 * np.max(np.abs(base))
  _, ref_zeroed = _reference(torch_model, tokens, layers=(1,), edit=('layers.1.mlp', torch.zeros_like))
  assert_close(zeroed, ref_zeroed, what='mlp zeroed')
  # A Partial's arguments are traced inputs: the same program serves any scale.
  scale = jax.tree_util.Partial(lambda s, x: s * x, jnp.float32(0.5))
  halved = model.logits(tokens, replace={'layers.1': scale})
  _, ref_halved = _reference(torch_model, tokens, layers=(1,), edit=('layers.1', lambda x: 0.5 * x))
  assert_close(halved, ref_halved, what='residual halved')


def test_runs_only_up_to_the_deepest_hookpoint(saved):
  _, folder = saved('gpt2')
  model = models.load_pretrained(folder)
  tokens = _tokens(3)
  expected = model.activations(tokens, ['layers.0.mlp', 'layers.0'])
  # Later layers and the unembedding are gone: any use of them would fail.
  model.params['layers'][1:] = [None] * (len(model.params['layers']) - 1)
  del model.params['final_norm']
  got = model.activations(tokens, ['layers.0', 'layers.0.mlp'])
  for hook in expected:
    np.testing.assert_array_equal(np.asarray(got[hook]), np.asarray(expected[hook]))
  with pytest.raises(ValueError, match='out of range'):
    model.activations(tokens, ['layers.3'])


def test_mesh_shards_weights_and_matches_single_device(saved):
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 devices (conftest forces 8 CPU devices)')
  _, folder = saved('llama_gqa_untied')
  mesh = make_mesh(data=2, model=4)
  sharded = models.load_pretrained(folder, mesh=mesh)
  assert 'model' in sharded.params['layers'][0]['mlp']['w_up'].sharding.spec
  assert 'model' in sharded.params['unembed'].sharding.spec
  single = models.load_pretrained(folder)
  tokens = _tokens(4)
  hooks = ['layers.1.mlp', 'layers.2']
  got, expected = sharded.activations(tokens, hooks), single.activations(tokens, hooks)
  for hook in hooks:
    assert_close(got[hook], expected[hook], rtol=1e-5, what=f'mesh {hook}')


def test_hf_cache_layout_resolves_offline(saved, tmp_path, monkeypatch):
  _, folder = saved('gpt2')
  snapshot = tmp_path / 'hub' / 'models--tiny-org--tiny-gpt2' / 'snapshots' / 'abc123'
  shutil.copytree(folder, snapshot)
  (snapshot.parent.parent / 'refs').mkdir()
  (snapshot.parent.parent / 'refs' / 'main').write_text('abc123')
  monkeypatch.setenv('HF_HOME', str(tmp_path))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  model = models.load_pretrained('tiny-org/tiny-gpt2')
  assert model.config.family == 'gpt2' and model.path == str(snapshot)


def test_missing_model_fails_fast_with_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HOME', str(tmp_path))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    models.load_pretrained('EleutherAI/pythia-160m')
  assert time.monotonic() - start < 2.0
  message = str(info.value)
  assert '\n' not in message and '--config.model=' in message and str(tmp_path / 'hub') in message
  with pytest.raises(FileNotFoundError, match='--config.model='):
    models.load_pretrained(str(tmp_path / 'no' / 'such' / 'folder'))
  with pytest.raises(FileNotFoundError, match='copy the folder to local disk'):
    models.load_pretrained('gs://bucket/pythia-160m')


def test_unknown_architecture_is_a_value_error(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert', 'architectures': ['BertModel']}))
  with pytest.raises(ValueError, match='supported are gpt_neox, gpt2, llama'):
    models.load_pretrained(tmp_path)


@pytest.mark.parametrize('name', ['neox_parallel', 'gpt2', 'llama_gqa_untied'])
def test_abstract_params_are_the_loaders_pytree(saved, name):
  from saejax.models import shapes

  model = models.load_pretrained(saved(name)[1], dtype=jnp.float32)
  loaded = jax.tree.map(lambda a: (a.shape, a.dtype), model.params)
  abstract = jax.tree.map(lambda a: (a.shape, a.dtype), shapes.abstract_params(model.config, jnp.float32))
  assert jax.tree.structure(abstract) == jax.tree.structure(loaded)
  assert jax.tree.leaves(abstract) == jax.tree.leaves(loaded)


@pytest.mark.parametrize('name', ['neox_parallel', 'llama_gqa_untied'])
def test_attention_kinds_agree(saved, name):
  from saejax.models import forward as forward_lib

  model = models.load_pretrained(saved(name)[1], dtype=jnp.float32)
  tokens = jnp.asarray(_tokens())

  def logits(kind, block=64):
    _, out = forward_lib.forward(
      model.params, tokens, {}, cfg=model.config, taps=(), want_logits=True, attention=kind, attention_block=block
    )
    return out

  dense = logits('dense')
  for kind, block in (('chunked', 5), ('chunked', 512), ('fused', 64)):
    assert_close(logits(kind, block), dense, rtol=1e-5, what=f'{name} {kind} block={block}')
