"""A tiny offline language model for end-to-end tests: random GPT-NeoX weights, a locally trained byte-level BPE
tokenizer and a jsonl corpus, built in a second without torch or the Hub."""

import json
import os
import subprocess
import sys

import numpy as np

from saejax.models.random_checkpoint import write_random_neox
from tests import forkserver

WORDS = [
  'the',
  'a',
  'sparse',
  'autoencoder',
  'latent',
  'feature',
  'model',
  'token',
  'layer',
  'seed',
  'dictionary',
  'matches',
  'across',
  'runs',
]


def make_tiny_lm(root):
  """Returns (model folder, corpus.jsonl path) under `root`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  rng = np.random.default_rng(0)
  docs = [' '.join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for _ in range(400)]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
    docs,
    trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  model = root / 'tiny-neox'
  write_random_neox(
    str(model),
    dtype=np.float32,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=tokenizer.get_vocab_size(),
    max_position_embeddings=64,
  )
  tokenizer.save(str(model / 'tokenizer.json'))
  corpus = root / 'corpus.jsonl'
  corpus.write_text(''.join(json.dumps({'text': doc}) + '\n' for doc in docs))
  return model, corpus


CONTEXT, ROWS = 17, 8  # tokens per sequence and sequences per batch of the tiny runs


def tiny_train_args(model, corpus, workdir) -> list[str]:
  """`experiments.train` arguments of the standard tiny LM run: 3 seeds, 40 steps, layers.1.mlp, eval at the end."""
  batch = CONTEXT * ROWS
  return [
    '--config=pythia160m',
    f'--workdir={workdir}',
    f'--config.model={model}',
    f'--config.dataset={corpus}',
    '--config.hookpoint=layers.1.mlp',
    '--config.d_in=32',
    '--config.lm_dtype=float32',
    '--config.num_latents=64',
    '--config.k=4',
    f'--config.context_length={CONTEXT}',
    f'--config.batch_size={batch}',
    f'--config.num_tokens={batch * 40}',
    '--config.init_seeds=0,1,2',
    '--config.lr=3e-3',
    '--config.warmup_steps=5',
    f'--config.eval_tokens={batch * 2}',
    '--config.log_every=10',
    '--config.checkpoint_every=20',
  ]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_ENV = {
  **os.environ,
  'JAX_PLATFORMS': 'cpu',
  'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  'HF_HUB_OFFLINE': '1',
  'HF_DATASETS_OFFLINE': '1',
}


def run_cli(module, *args, timeout=600) -> subprocess.CompletedProcess:
  """`python -m module args` on one CPU device, offline, from the repository root."""
  return forkserver.run(
    [sys.executable, '-m', module, *args], cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=timeout
  )
