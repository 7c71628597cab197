"""SAE math: one architecture per module, each a set of pure functions over a parameter dict."""

from saejax.sae import dense, topk
from saejax.sae.base import Architecture, Params, SaeSpec, data_b_dec, fvu, unit_rows

ARCHITECTURES: dict[str, Architecture] = {
  arch.name: arch for arch in (topk.ARCH, dense.BATCHTOPK, dense.MATRYOSHKA, dense.RELU, dense.GATED, dense.JUMPRELU)
}


def get(name: str) -> Architecture:
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown SAE architecture {name!r}; use one of {", ".join(ARCHITECTURES)}')
  return ARCHITECTURES[name]


__all__ = ['ARCHITECTURES', 'Architecture', 'Params', 'SaeSpec', 'data_b_dec', 'fvu', 'get', 'unit_rows']
