"""Curve fits of Fig. 2: the fraction of latents found only in the base SAE against the number of seeds k.

This module owns the three candidate models, their start points, the goodness-of-fit numbers (per-point
residuals, RSS, AIC) and the choice of the best model. The paper's claim to reproduce: a power law *with* an
offset fits better than one without, i.e. some orphans remain however many seeds are trained.

  power_offset  a * k**b + c      start a=0.72, b=-0.35, c=0 (the authors')    asymptote c (for b < 0)
  power         a * k**b          start a=0.72, b=-0.35                        asymptote 0 (for b < 0)
  exp_offset    a * exp(-b * k) + c   start from the data's range              asymptote c (for b > 0)

AIC = n * log(RSS / n) + 2 p, lower is better; RSS is floored at the smallest positive float so an exact fit
gives a finite (very negative) AIC. A fit that fails (too few points, no convergence, non-finite numbers) is
reported with its error string and left out of the choice; it never raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


def power_offset(k, a, b, c):
  return a * np.power(k, b) + c


def power(k, a, b):
  return a * np.power(k, b)


def exp_offset(k, a, b, c):
  return a * np.exp(-b * k) + c


def _power_asymptote(params: Mapping[str, float], offset: float) -> float:
  b = params['b']
  if b < 0:
    return offset
  if b == 0:
    return params['a'] + offset
  return math.copysign(math.inf, params['a'])


def _exp_asymptote(params: Mapping[str, float]) -> float:
  if params['b'] > 0:
    return params['c']
  if params['b'] == 0:
    return params['a'] + params['c']
  return math.copysign(math.inf, params['a'])


def _exp_start(k_K: np.ndarray, y_K: np.ndarray) -> list[float]:
  span = float(k_K[-1] - k_K[0]) or 1.0
  return [float(y_K[0] - y_K[-1]) * math.exp(2.0 * float(k_K[0]) / span) or 1.0, 2.0 / span, float(y_K[-1])]


# name -> (function, parameter names, start point from (k, y), asymptote from the fitted parameters)
MODELS: dict[str, tuple[Callable, tuple[str, ...], Callable, Callable]] = {
  'power_offset': (
    power_offset,
    ('a', 'b', 'c'),
    lambda k, y: [0.72, -0.35, 0.0],
    lambda p: _power_asymptote(p, p['c']),
  ),
  'power': (power, ('a', 'b'), lambda k, y: [0.72, -0.35], lambda p: _power_asymptote(p, 0.0)),
  'exp_offset': (exp_offset, ('a', 'b', 'c'), _exp_start, _exp_asymptote),
}


def aic(rss: float, n: int, n_params: int) -> float:
  rss = max(float(rss), np.finfo(np.float64).tiny)
  return n * math.log(rss / n) + 2 * n_params


def fit_model(name: str, k_K, y_K, maxfev: int = 20000) -> dict[str, Any]:
  """One model fitted by scipy.optimize.curve_fit; on failure the report carries `error` and NaNs."""
  function, param_names, start, asymptote = MODELS[name]
  k_K = np.asarray(k_K, dtype=np.float64)
  y_K = np.asarray(y_K, dtype=np.float64)
  report: dict[str, Any] = {
    'model': name,
    'n': int(k_K.size),
    'n_params': len(param_names),
    'params': None,
    'residuals': None,
    'rss': math.nan,
    'aic': math.nan,
    'asymptote': math.nan,
    'error': None,
  }
  try:
    if k_K.size < len(param_names):
      raise ValueError(f'{k_K.size} points cannot fit {len(param_names)} parameters')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', OptimizeWarning)
      warnings.simplefilter('ignore', RuntimeWarning)
      popt, _ = curve_fit(function, k_K, y_K, p0=start(k_K, y_K), maxfev=maxfev)
    residuals_K = y_K - function(k_K, *popt)
    if not (np.all(np.isfinite(popt)) and np.all(np.isfinite(residuals_K))):
      raise FloatingPointError(f'non-finite fit: params {popt.tolist()}')
  except Exception as error:  # any failure is reported, never raised
    report['error'] = f'{type(error).__name__}: {error}'
    return report
  params = {p: float(v) for p, v in zip(param_names, popt)}
  rss = float(np.sum(residuals_K**2))
  report.update(
    params=params,
    residuals=[float(r) for r in residuals_K],
    rss=rss,
    aic=aic(rss, k_K.size, len(param_names)),
    asymptote=float(asymptote(params)),
  )
  return report


def fit_unique_fraction(
  k_K: Sequence[float] | Mapping[int, float],
  y_K: Sequence[float] | None = None,
  models: Sequence[str] = tuple(MODELS),
) -> dict[str, Any]:
  """Fits every model to (k, unique fraction); accepts SeedsResult.unique_fraction_by_k as a {k: y} mapping.

  Returns {'k', 'y', 'models': {name: report}, 'best': name of the lowest AIC among the fits that worked, or
  None when none did}. Each report: params, residuals (y - fit, per point), rss, aic, asymptote, error.
  """
  if isinstance(k_K, Mapping):
    if y_K is not None:
      raise ValueError('pass either a {k: y} mapping or two sequences')
    items = sorted(k_K.items())
    k_K, y_K = [k for k, _ in items], [y for _, y in items]
  if y_K is None or len(k_K) != len(y_K):
    raise ValueError('k and y need the same length')
  order = np.argsort(np.asarray(k_K, dtype=np.float64), kind='stable')
  k_K = np.asarray(k_K, dtype=np.float64)[order]
  y_K = np.asarray(y_K, dtype=np.float64)[order]
  reports = {name: fit_model(name, k_K, y_K) for name in models}
  fitted = [name for name in models if reports[name]['error'] is None]
  best = min(fitted, key=lambda name: reports[name]['aic']) if fitted else None
  return {'k': k_K.tolist(), 'y': y_K.tolist(), 'models': reports, 'best': best}
