"""DCM circuits of a chosen size (``dcm.target_fraction``): the L1 weight ``reg`` is
searched by bisection in log space, one full DCM run per probe, since the kept fraction
falls as ``reg`` grows. The run closest to the target is the circuit."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from cca_jax.cca import components, dcm
from cca_jax.cca.examples import LocalizationExample

REG_RANGE = (1e-7, 10.0)  # the search bracket for reg


def train_mask_of_size(model, examples: Sequence[LocalizationExample], config: dcm.DCMConfig, pad_token_id: int = 0,
                       progress: bool = True, log: Callable[[str], None] = print):
    """(DCMResult of the run closest to ``config.target_fraction``, search history)."""
    target, total = config.target_fraction, components.total(model.config)
    lo, hi = (math.log10(r) for r in REG_RANGE)
    x = min(max(math.log10(max(config.reg, REG_RANGE[0])), lo), hi)
    best, history = None, []
    for i in range(config.target_max_runs):
        reg = 10.0 ** x
        res = dcm.train_mask(model, examples, dataclasses.replace(config, reg=reg, target_fraction=None),
                             pad_token_id=pad_token_id, progress=progress)
        frac = components.count(res.mask) / total
        history.append({"run": i, "reg": reg, "fraction": frac})
        log(f"dcm size search: reg {reg:.3g} keeps {100 * frac:.2f}% (target {100 * target:.2f}%)")
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (res, frac, reg)
        if abs(frac - target) <= config.target_tolerance * target:
            break
        if frac > target:  # too many kept: a stronger L1 pull
            lo = x
        else:
            hi = x
        x = (lo + hi) / 2
    return best[0], {"target_fraction": target, "reg": best[2], "fraction": best[1], "runs": history}
