"""saejax's GGUF reader against transformers' GGUF loader: tiny random Llamas written the way llama.cpp's converter
writes them (q / k rows permuted per head, tensors in many quantization types), the real SmolLM2 file, bad files.

The tiny models are "loud" (O(1) pre-activations, norm weights off 1) so that any layout mistake shows at fp32
tolerance; both sides dequantize the same bytes with the `gguf` package, so they agree to float rounding.
"""

import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import models
from saejax.models import gguf as gguf_lib
from saejax.sharding import make_mesh
from tests import forkserver
from tests.test_models import _reference

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')

Q = gguf.GGMLQuantizationType
VOCAB, D, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 96, 64, 4, 2, 16, 256, 3
B, T = 2, 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One type per layer for each matrix, so every supported writeable type and two K-quants appear.
TYPES = {
  'attn_q': (Q.Q4_0, Q.F16, Q.Q5_1),
  'attn_k': (Q.Q8_0, Q.Q4_1, Q.BF16),
  'attn_v': (Q.F16, Q.Q5_0, Q.Q4_0),
  'attn_output': (Q.Q4_1, Q.Q8_0, Q.F32),
  'ffn_gate': (Q.Q5_0, Q.Q4_0, Q.Q8_0),
  'ffn_up': (Q.BF16, Q.Q4_1, Q.F16),
  'ffn_down': (Q.Q4_K, Q.Q6_K, Q.Q4_1),
}
QUICK_FOX = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]  # "The quick brown fox jumps over the lazy dog."


def llama_cpp_permute(w_RxI: np.ndarray, heads: int) -> np.ndarray:
  """What llama.cpp's converter does to HF q / k rows: GGUF row 2i <- HF row i, 2i + 1 <- HF row i + hd/2."""
  hd = w_RxI.shape[0] // heads
  order = np.empty(w_RxI.shape[0], np.int64)
  for h in range(heads):
    for i in range(hd // 2):
      order[h * hd + 2 * i] = h * hd + i
      order[h * hd + 2 * i + 1] = h * hd + i + hd // 2
  return w_RxI[order]


def random_k_quant(qtype, rows: int, cols: int, rng) -> np.ndarray:
  """Random K-quant blocks (the gguf package cannot quantize to K types) with sane f16 super-block scales."""
  block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
  if qtype == Q.Q4_K:  # d, dmin (f16) lead the block; w = d * sc * q - dmin * m with 6-bit sc, m and 4-bit q
    raw[..., 0:2] = np.full(raw.shape[:2], 1.2e-3, np.float16)[..., None].view(np.uint8)
    raw[..., 2:4] = np.full(raw.shape[:2], 8e-3, np.float16)[..., None].view(np.uint8)
  elif qtype == Q.Q6_K:  # d (f16) ends the block; w = d * scale_i8 * (q6 - 32)
    raw[..., -2:] = np.full(raw.shape[:2], 1e-4, np.float16)[..., None].view(np.uint8)
  else:
    raise NotImplementedError(qtype)
  return raw.reshape(rows, -1)


def encode(name: str, w: np.ndarray, qtype, rng):
  """(array for the writer, raw dtype) of an HF-layout float32 tensor stored as `qtype`."""
  if qtype in (Q.Q4_K, Q.Q6_K):
    return random_k_quant(qtype, *w.shape, rng), qtype
  if qtype == Q.F32:
    return w.astype(np.float32), None
  if qtype == Q.F16:
    return w.astype(np.float16), None
  return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_tiny_llama(path, tied: bool, seed: int = 0, arch: str = 'llama', extra_tensor=None) -> dict:
  """A random GQA Llama as llama.cpp writes it; returns its dequantized HF-layout weights (name -> (out, in))."""
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name('tiny-llama')
  writer.add_context_length(64)
  writer.add_embedding_length(D)
  writer.add_block_count(LAYERS)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_dimension_count(HEAD_DIM)
  writer.add_rope_freq_base(5000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  if tied:  # vocab size from the token list, as in files without `llama.vocab_size`
    writer.add_tokenizer_model('gpt2')
    writer.add_token_list([f'<t{i}>' for i in range(VOCAB)])
  else:
    writer.add_vocab_size(VOCAB)
  hf = {}

  def add(name, w, qtype, heads=None):
    data, raw_dtype = encode(name, llama_cpp_permute(w, heads) if heads else w, qtype, rng)
    writer.add_tensor(name, data, raw_dtype=raw_dtype)
    # q / k blocks lie within rows, so quantizing the HF rows directly gives the HF layout of what was stored.
    unpermuted = encode(name, w, qtype, rng)[0] if heads else data
    hf[name] = gguf.quants.dequantize(unpermuted, qtype).astype(np.float32)

  def norm():
    return (1.0 + 0.3 * rng.standard_normal(D)).astype(np.float32)

  add('token_embd.weight', rng.standard_normal((VOCAB, D)).astype(np.float32), Q.Q8_0)
  shapes = {
    'attn_q': (HEADS * HEAD_DIM, D),
    'attn_k': (KV_HEADS * HEAD_DIM, D),
    'attn_v': (KV_HEADS * HEAD_DIM, D),
    'attn_output': (D, HEADS * HEAD_DIM),
    'ffn_gate': (FFN, D),
    'ffn_up': (FFN, D),
    'ffn_down': (D, FFN),
  }
  for i in range(LAYERS):
    add(f'blk.{i}.attn_norm.weight', norm(), Q.F32)
    for kind, shape in shapes.items():
      w = (2.0 / np.sqrt(shape[1]) * rng.standard_normal(shape)).astype(np.float32)
      heads = {'attn_q': HEADS, 'attn_k': KV_HEADS}.get(kind)
      add(f'blk.{i}.{kind}.weight', w, TYPES[kind][i], heads)
    add(f'blk.{i}.ffn_norm.weight', norm(), Q.F32)
  add('output_norm.weight', norm(), Q.F32)
  if not tied:
    add('output.weight', (0.3 * rng.standard_normal((VOCAB, D))).astype(np.float32), Q.F16)
  if extra_tensor is not None:
    writer.add_tensor(*extra_tensor)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return hf


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """'tied' / 'untied' -> (gguf path, HF-layout weights)."""
  out = {}
  for variant in ('tied', 'untied'):
    path = tmp_path_factory.mktemp(variant) / f'tiny-{variant}.gguf'
    out[variant] = (path, write_tiny_llama(path, tied=variant == 'tied', seed=len(out)))
  return out


def hf_reference(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=torch.float32
  ).eval()


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def tokens(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T)).astype(np.int32)


def one_line_value_error(fn, *args, match: str) -> str:
  with pytest.raises(ValueError, match=match) as info:
    fn(*args)
  message = str(info.value)
  assert '\n' not in message and len(message) < 400, message
  return message


# --- the tiny random Llama ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant', ['tied', 'untied'])
def test_tiny_llama_matches_transformers_gguf_load(tiny, variant):
  path, _ = tiny[variant]
  model = models.load_pretrained(path)
  cfg = model.config
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (LAYERS, D, HEADS, 2, 16)
  assert (cfg.vocab_size, cfg.intermediate_size, cfg.bos_token_id, cfg.eos_token_id) == (VOCAB, FFN, 1, 2)
  assert cfg.norm_eps == 1e-5 and cfg.rope.theta == 5000.0 and cfg.rope.dim == HEAD_DIM
  assert cfg.tie_word_embeddings == (variant == 'tied') and ('unembed' in model.params) == (variant == 'untied')
  assert model.path == str(path)
  toks = tokens()
  ref_acts, ref_logits = _reference(hf_reference(path), toks, layers=(0, 2))
  acts = model.activations(toks, list(ref_acts))
  for hook, ref in ref_acts.items():
    assert np.max(np.abs(ref)) > 0.5, f'{hook} is not loud enough to show layout errors'
    assert rel_err(acts[hook], ref) < 1e-5, hook
  logits = model.logits(toks)
  assert rel_err(logits, ref_logits) < 1e-5
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(ref_logits, -1))


def test_weights_are_the_hf_layout_transposed(tiny):
  path, hf = tiny['untied']
  params = models.load_pretrained(path).params
  np.testing.assert_array_equal(np.asarray(params['embed']), hf['token_embd.weight'])
  np.testing.assert_array_equal(np.asarray(params['unembed']), hf['output.weight'])
  for i, layer in enumerate(params['layers']):
    for key, name in (('wq', 'attn_q'), ('wk', 'attn_k'), ('wv', 'attn_v'), ('wo', 'attn_output')):
      np.testing.assert_array_equal(np.asarray(layer['attn'][key]), hf[f'blk.{i}.{name}.weight'].T)
    for key, name in (('w_gate', 'ffn_gate'), ('w_up', 'ffn_up'), ('w_down', 'ffn_down')):
      np.testing.assert_array_equal(np.asarray(layer['mlp'][key]), hf[f'blk.{i}.{name}.weight'].T)
    np.testing.assert_array_equal(np.asarray(layer['ln1']['scale']), hf[f'blk.{i}.attn_norm.weight'])
  # K-quant blocks were written as raw random bytes: they must decode to real, varied weights.
  assert np.std(hf['blk.0.ffn_down.weight']) > 0.05 and np.isfinite(hf['blk.1.ffn_down.weight']).all()


def test_unpermute_rows_inverts_llama_cpp_permute():
  w_RxI = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(gguf_lib.unpermute_rows(llama_cpp_permute(w_RxI, 3), 3), w_RxI)
  # HF row i of head 1 is GGUF row 2i, row i + hd/2 is GGUF row 2i + 1.
  gguf_rows = llama_cpp_permute(w_RxI, 3)
  np.testing.assert_array_equal(gguf_rows[8 + 2 * 1], w_RxI[8 + 1])
  np.testing.assert_array_equal(gguf_rows[8 + 2 * 1 + 1], w_RxI[8 + 1 + 4])


def test_skipping_the_qk_unpermutation_gives_wrong_logits(tiny, monkeypatch):
  path, _ = tiny['untied']
  toks = tokens(1)
  _, ref_logits = _reference(hf_reference(path), toks, layers=())
  assert rel_err(models.load_pretrained(path).logits(toks), ref_logits) < 1e-5
  monkeypatch.setattr(gguf_lib, 'unpermute_rows', lambda w, heads: w)
  wrong = np.asarray(models.load_pretrained(path).logits(toks))
  assert rel_err(wrong, ref_logits) > 0.3  # measured: about 1.1 (and 1e-6 with the un-permutation)
  assert np.mean(np.argmax(wrong, -1) == np.argmax(ref_logits, -1)) < 0.8


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_load(tiny, dtype):
  path, _ = tiny['tied']
  full, half = models.load_pretrained(path), models.load_pretrained(path, dtype=dtype)
  assert half.params['layers'][1]['mlp']['w_down'].dtype == dtype and half.params['embed'].dtype == dtype
  toks = tokens(2)
  assert rel_err(half.logits(toks), full.logits(toks)) < 5e-2


def test_mesh_places_matrices_like_the_safetensors_loader(tiny):
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 devices (conftest forces 8 CPU devices)')
  path, _ = tiny['untied']
  mesh = make_mesh(data=2, model=4)
  sharded, single = models.load_pretrained(path, mesh=mesh), models.load_pretrained(path)
  attn, mlp = sharded.params['layers'][0]['attn'], sharded.params['layers'][0]['mlp']
  specs = {
    'wq': (None, 'model'),
    'wk': (None, 'model'),
    'wv': (None, 'model'),
    'wo': ('model', None),
  }
  for key, spec in specs.items():
    assert tuple(attn[key].sharding.spec) == spec, key
  assert tuple(mlp['w_gate'].sharding.spec) == (None, 'model') and tuple(mlp['w_up'].sharding.spec) == (None, 'model')
  assert tuple(mlp['w_down'].sharding.spec) == ('model', None)
  assert tuple(sharded.params['embed'].sharding.spec) == ('model', None)
  assert tuple(sharded.params['unembed'].sharding.spec) == ('model', None)
  assert tuple(sharded.params['final_norm']['scale'].sharding.spec) == (None,)
  assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(sharded.params))
  toks = tokens(3)
  hooks = ['layers.1.mlp', 'layers.2']
  got, expected = sharded.activations(toks, hooks), single.activations(toks, hooks)
  for hook in hooks:
    assert rel_err(got[hook], expected[hook]) < 1e-5, hook


def test_folder_and_read_config(tiny, tmp_path):
  path, _ = tiny['untied']
  folder = tmp_path / 'one'
  folder.mkdir()
  (folder / path.name).symlink_to(path)
  model = models.load_pretrained(folder)
  assert model.path == str(folder / path.name)
  assert models.read_config(folder) == model.config == gguf_lib.read_config(path)


# --- bad input: one ValueError / FileNotFoundError line ---------------------------------------------------------------


def test_truncated_tiny_file_is_a_value_error(tiny, tmp_path):
  path, _ = tiny['untied']
  data = path.read_bytes()
  reader = gguf.GGUFReader(path)
  last_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
  for cut in (10, 200, len(data) // 2, last_end - 1):
    cut_path = tmp_path / f'cut{cut}.gguf'
    cut_path.write_bytes(data[:cut])
    message = one_line_value_error(models.load_pretrained, cut_path, match='truncated|not a readable GGUF')
    assert str(cut_path) in message
  empty = tmp_path / 'empty.gguf'
  empty.write_bytes(b'')
  one_line_value_error(models.load_pretrained, empty, match='not a GGUF file')
  not_gguf = tmp_path / 'model.gguf'
  not_gguf.write_text('{"hello": "world"}')
  one_line_value_error(models.load_pretrained, not_gguf, match='not a GGUF file')


def test_truncated_real_file_is_a_value_error(smollm2_gguf, tmp_path):
  cut_path = tmp_path / 'half.gguf'
  with open(smollm2_gguf, 'rb') as src, open(cut_path, 'wb') as dst:
    dst.write(src.read(os.path.getsize(smollm2_gguf) // 2))
  message = one_line_value_error(models.load_pretrained, cut_path, match='truncated')
  assert 'download it again' in message


def test_unsupported_architecture(tmp_path):
  path = tmp_path / 'falcon.gguf'
  write_tiny_llama(path, tied=True, arch='falcon')
  message = one_line_value_error(models.load_pretrained, path, match="architecture 'falcon'")
  assert 'llama' in message and '--config.model=' in message
  one_line_value_error(gguf_lib.read_config, path, match="architecture 'falcon'")


def test_unsupported_quantization_type(tmp_path):
  # Q8_1 is a real ggml type that gguf 0.19 cannot dequantize: written as raw blocks, it must be refused up front.
  block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
  extra = ('extra.weight', np.zeros((2, 2 * type_size), np.uint8), None, Q.Q8_1)
  path = tmp_path / 'q8_1.gguf'
  write_tiny_llama(path, tied=True, extra_tensor=extra)
  with pytest.raises(NotImplementedError):
    gguf.quants.dequantize(gguf.GGUFReader(path).tensors[-1].data, Q.Q8_1)
  message = one_line_value_error(models.load_pretrained, path, match='Q8_1')
  assert 'extra.weight' in message and 'cannot dequantize' in message


def test_unsupported_type_raised_while_loading(tiny, monkeypatch):
  path, _ = tiny['tied']
  real = gguf.quants.dequantize

  def refuse_q4_1(data, qtype):
    if qtype == Q.Q4_1 and data.shape[0] > 1:  # let the up-front probe pass: the refusal comes mid-load
      raise NotImplementedError('Dequantization for Q4_1 is not yet implemented')
    return real(data, qtype)

  monkeypatch.setattr(gguf.quants, 'dequantize', refuse_q4_1)
  one_line_value_error(models.load_pretrained, path, match=r"'blk\.0\.attn_output\.weight' is stored as Q4_1")


def test_folders_without_exactly_one_gguf(tiny, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='neither config.json nor a .gguf') as info:
    models.load_pretrained(empty)
  assert '\n' not in str(info.value) and '--config.model=' in str(info.value)
  several = tmp_path / 'several'
  several.mkdir()
  for variant in ('tied', 'untied'):
    (several / tiny[variant][0].name).symlink_to(tiny[variant][0])
  message = one_line_value_error(models.load_pretrained, several, match='holds 2 .gguf files')
  assert 'tiny-tied.gguf' in message and '--config.model=' in message


def test_missing_gguf_file_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match='no GGUF file at') as info:
    models.load_pretrained(tmp_path / 'nope.gguf')
  assert '\n' not in str(info.value) and '--config.model=' in str(info.value)


def test_registry_name_missing_names_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv('SAEJAX_CACHE', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='python -m experiments.fetch smollm2') as info:
    models.load_pretrained('smollm2')
  assert '\n' not in str(info.value)


@pytest.mark.slow
def test_cli_truncated_gguf_exits_2_with_one_line(tiny, tmp_path):
  path, _ = tiny['untied']
  cut_path = tmp_path / 'cut.gguf'
  cut_path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2', HF_HUB_OFFLINE='1')
  result = forkserver.run(
    [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=synthetic',
      '--config.source=lm',
      f'--config.model={cut_path}',
      f'--config.d_in={D}',
      '--config.hookpoint=layers.1.mlp',
      '--config.context_length=16',
      '--config.batch_size=64',
      f'--workdir={tmp_path / "run"}',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert str(cut_path) in lines[0] and 'truncated' in lines[0], lines[0]


# --- the real file: SmolLM2-135M-Instruct, Q4_1 ------------------------------------------------------------------


@pytest.fixture(scope='module')
def smollm2(smollm2_gguf):
  return models.load_pretrained(smollm2_gguf)


def test_smollm2_config_and_next_token(smollm2, smollm2_gguf):
  cfg = smollm2.config
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
  assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (49152, 1536, 8192)
  assert cfg.norm_eps == 1e-5 and cfg.rope.theta == 100000.0 and cfg.rope.dim == 64 and cfg.tie_word_embeddings
  assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2) and smollm2.path == str(smollm2_gguf)
  assert 'unembed' not in smollm2.params
  assert models.read_config('smollm2') == cfg
  logits = np.asarray(smollm2.logits(np.asarray([QUICK_FOX], np.int32)))
  # A real LM: after "The quick brown fox jumps over the lazy" the most likely next token is " dog".
  assert int(np.argmax(logits[0, -3])) == QUICK_FOX[-2]


@pytest.mark.slow  # transformers' GGUF load alone takes 40 s on a 2-core CPU
def test_smollm2_matches_transformers(smollm2, smollm2_gguf):
  toks = np.asarray([QUICK_FOX], np.int32)
  ref_acts, ref_logits = _reference(hf_reference(smollm2_gguf), toks, layers=(15,))
  got = smollm2.activations(toks, ['layers.15.mlp'])['layers.15.mlp']
  assert rel_err(got, ref_acts['layers.15.mlp']) < 1e-4
  logits = smollm2.logits(toks)
  assert rel_err(logits, ref_logits) < 1e-4
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(ref_logits, -1))
