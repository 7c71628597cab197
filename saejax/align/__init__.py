"""Exact matching of SAE latents across seeds: blockwise cosine kernels, a dense lapjv path and a certified sparse path.

Entry points: `match_latents` (-> `Matching`), `max_cosine`, `certify`. See match.py for the choice of solver.
"""

from saejax.align.cosine import dense_cosine, max_cosine, topk_candidates
from saejax.align.match import Matching, match_latents
from saejax.align.sparse import Certificate, certify

__all__ = ['Certificate', 'Matching', 'certify', 'dense_cosine', 'match_latents', 'max_cosine', 'topk_candidates']
