"""CPU timing baseline for EleutherAI sparsify's own TopK SAE training step.

Owns `sparsify_step_seconds`, which glues sparsify's library pieces (SparseCoder, its fused encoder, eager
embedding_bag decoder, FVU loss, decoder-gradient projection, decoder renormalisation) into exactly one iteration
of `sparsify.trainer.Trainer.fit`'s inner loop (loss_fn='fvu', grad_acc_steps=1, micro_acc_steps=1, auxk_alpha=0)
and times it on CPU torch. Run as `python -m experiments.sparsify_baseline ...` to print one JSON line.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

with contextlib.redirect_stdout(sys.stderr):  # sparsify prints 'Triton not installed ...' at import time
  import sparsify
  from schedulefree import ScheduleFreeWrapper
  from sparsify import SparseCoder, SparseCoderConfig
  from sparsify.sign_sgd import SignSGD
  from sparsify.utils import decoder_impl
  from transformers import get_linear_schedule_with_warmup


def _make_optimizer(sae, optimizer: str):
  """Build the optimizer (and schedulers) exactly as `Trainer.__init__` does for one SAE."""
  if optimizer == 'adam':  # trainer tries bitsandbytes Adam8bit first; it is not installed, so torch.optim.Adam
    lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
    return opt, [get_linear_schedule_with_warmup(opt, 1000, 100_000)], lr
  if optimizer == 'signum':  # the trainer's default: schedule-free SignSGD
    lr = 5e-3 / (sae.num_latents / (2**14)) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    return opt, [], lr
  raise ValueError(f'unknown optimizer {optimizer!r}')


def sparsify_step_seconds(
  d_in: int, num_latents: int, k: int, batch: int, repeats: int = 5, warmup: int = 2, optimizer: str = 'adam'
) -> dict:
  """Time one sparsify training step (TopK SAE, FVU loss) on CPU; min and median over `repeats` steps."""
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  prev_precision = torch.get_float32_matmul_precision()
  torch.set_float32_matmul_precision('high')  # Trainer.fit sets this before training
  try:
    torch.manual_seed(0)  # Trainer: torch.manual_seed(seed) per init seed (default [0]) before building the SAE
    cfg = SparseCoderConfig(activation='topk', num_latents=num_latents, k=k)
    sae = SparseCoder(d_in, cfg, 'cpu', dtype=torch.float32)
    opt, schedulers, lr = _make_optimizer(sae, optimizer)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, d_in, generator=gen, dtype=torch.float32)
    # global_step == 0 branch of the trainer's hook: initialise b_dec to the batch mean
    sae.b_dec.data = x.mean(0).to(sae.dtype)
    did_fire = torch.zeros(num_latents, dtype=torch.bool)
    num_tokens_since_fired = torch.zeros(num_latents, dtype=torch.long)
    fvus = []

    def step():
      # --- hook body (loss_fn='fvu', micro_acc_steps=1, autoencoding so inputs == outputs) ---
      sae.set_decoder_norm_to_unit_norm()  # cfg.normalize_decoder and not transcode
      total_variance = (x - x.mean(0)).pow(2).sum()
      out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)  # auxk_alpha=0 -> dead_mask None
      did_fire[out.latent_indices.flatten()] = True
      fvus.append(float(out.fvu.detach()))
      loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
      loss.div(1).backward()
      # --- step body (substep == 0) ---
      sae.remove_gradient_parallel_to_decoder_directions()
      opt.step()  # no gradient clipping anywhere in sparsify's trainer
      opt.zero_grad()
      for sched in schedulers:
        sched.step()
      with torch.no_grad():
        num_tokens_since_fired.add_(batch)
        num_tokens_since_fired[did_fire] = 0
        did_fire.zero_()

    for _ in range(warmup):
      step()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
  finally:
    torch.set_float32_matmul_precision(prev_precision)

  decoder = getattr(decoder_impl, '__name__', str(decoder_impl))
  notes = (
    f"sparsify Trainer default optimizer is 'signum' (ScheduleFreeWrapper(SignSGD), momentum 0.95); timed "
    f'optimizer={optimizer!r} lr={lr:.3e} (adam: trainer uses bitsandbytes Adam8bit if present, else '
    'torch.optim.Adam, lr 2e-4/sqrt(num_latents/2^14), linear warmup schedule). No grad clipping in the trainer. '
    f'Encoder: sparsify FusedEncoder (dense linear+relu+topk fwd; index_add sparse bwd). Decoder: {decoder} '
    '(sparse gather via F.embedding_bag; triton/xformers kernel only on GPU), its backward yields a dense W_dec grad. '
    'Step = set_decoder_norm_to_unit_norm + forward (FVU, auxk off, multi_topk off) + backward + '
    'remove_gradient_parallel_to_decoder_directions + opt.step/zero_grad + sched.step + dead-latent counters. '
    "Excludes LM forward and the hook's mask/clone data plumbing. fp32; float32_matmul_precision='high' as in fit."
  )
  return {
    'step_s': min(times),
    'step_s_median': statistics.median(times),
    'times_s': times,
    'd_in': d_in,
    'num_latents': num_latents,
    'k': k,
    'batch': batch,
    'optimizer': optimizer,
    'fvu_first_last': [fvus[0], fvus[-1]],
    'torch': torch.__version__,
    'sparsify': getattr(sparsify, '__version__', 'unknown'),
    'threads': threads,
    'notes': notes,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--d_in', type=int, default=768)
  parser.add_argument('--num_latents', type=int, default=8192)
  parser.add_argument('--k', type=int, default=32)
  parser.add_argument('--batch', type=int, default=2048)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--optimizer', choices=['adam', 'signum'], default='adam')
  args = parser.parse_args(argv)
  print(
    json.dumps(
      sparsify_step_seconds(args.d_in, args.num_latents, args.k, args.batch, args.repeats, args.warmup, args.optimizer)
    )
  )


if __name__ == '__main__':
  main()
