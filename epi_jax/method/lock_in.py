"""Lock-in of EPI's mask: does a refresh release what it isolated, or does the mask only grow?

An isolated entry does not move, so its gradient, and with it its importance,
need not fall: on a small quadratic an isolated entry stays isolated for good.
These statistics measure that over a run, from the masks and importances at
its refreshes. Refresh ``r = 1..R`` turns the mask ``M_{r-1}`` into ``M_r``
(``M_0``: the mask before the first refresh, empty in a fresh run); ``I_r`` is
the importance the refresh ranked.

Per refresh (:func:`transition_counts`, cheap enough for the trainer to
compute on the device at each refresh and log as counts):

- ``release_fraction``: ``|M_{r-1} \\ M_r| / |M_{r-1}|``, the share of the
  isolated entries that the refresh released (None when nothing was isolated).
- ``importance_ratio``: mean ``I_r`` over ``M_{r-1}`` / mean ``I_r`` over its
  complement: how important the entries isolated during the last interval
  still look next to the trainable ones, measured *before* the new selection
  (after it, the isolated set is the top-p by construction). A ratio that
  stays far above 1 while nothing is released is lock-in.

Over the run (:func:`lock_in_summary`):

- ``mean_spell_refreshes``: an isolation spell is a maximal run of
  consecutive refreshes after which an entry is isolated; its length is the
  number of those refreshes. The mean is over completed spells (ended by a
  release) and ongoing ones (still isolated after the last refresh, counted
  up to it, so the mean is a lower bound of the spells' full length):
  ``sum_r |M_r| / (|M_0| + sum_r |M_r \\ M_{r-1}|)`` (each spell counts once
  per refresh it spans, and starts once).
- ``ongoing_spell_share``: spells still isolated after the last refresh /
  all spells (1.0: nothing ever released).
- means of the per-refresh curves, and of ``jaccard_vs_full`` (the Jaccard of
  the mask against full SFT's top-p importance set at the same step) when given.

:func:`lock_in_stats` computes all of it from sequences of masks and
importances (pytrees or arrays), for tests and offline analysis.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax.method import compact
from epi_jax.method import inspection
from epi_jax.method import layout
from epi_jax.method import refresh
from epi_jax.method.options import EPIOptions

COUNT_KEYS = ("entries", "isolated", "prev_isolated", "released", "entered",
              "importance_prev_isolated", "importance_prev_trainable")


def transition_counts(prev_mask, mask, importance, eligible=None) -> dict[str, Any]:
  """The counts of one refresh (``prev_mask -> mask``, ranked ``importance``).

  Bool pytrees (or arrays) of the same structure; works on numpy and on the
  device (jit it). ``eligible``: per leaf, True or a bool array broadcasting
  over it (default: every entry), the entries EPI may isolate; the others
  count nowhere (not as trainable either: a norm scale's importance is not
  comparable). Integer counts are int32 (keep a leaf under 2**31 entries);
  importance sums are float32.
  """
  p, m, imp = (jax.tree.leaves(t) for t in (prev_mask, mask, importance))
  if not (len(p) == len(m) == len(imp)):
    raise ValueError(f"prev_mask, mask and importance differ in structure: {len(p)}, {len(m)} "
                     f"and {len(imp)} leaves")
  elig = [True] * len(m) if eligible is None else list(eligible)
  if len(elig) != len(m):
    raise ValueError(f"eligible has {len(elig)} leaves, the masks {len(m)}")
  elig = [np.broadcast_to(np.asarray(e, bool), np.shape(x)) if e is True else
          jnp.broadcast_to(e, np.shape(x)) for e, x in zip(elig, m)]
  p = [a & e for a, e in zip(p, elig)]
  m = [b & e for b, e in zip(m, elig)]
  trainable = [e & ~a for a, e in zip(p, elig)]
  def total(xs, dtype):
    return sum((jnp.sum(x, dtype=dtype) for x in xs), jnp.zeros((), dtype))
  imp32 = [jnp.asarray(x, jnp.float32) for x in imp]
  return {"entries": total(elig, jnp.int32),
          "isolated": total(m, jnp.int32),
          "prev_isolated": total(p, jnp.int32),
          "released": total([a & ~b for a, b in zip(p, m)], jnp.int32),
          "entered": total([b & ~a for a, b in zip(p, m)], jnp.int32),
          "importance_prev_isolated": total([jnp.where(a, x, 0.0) for a, x in zip(p, imp32)],
                                            jnp.float32),
          "importance_prev_trainable": total(
              [jnp.where(t, x, 0.0) for t, x in zip(trainable, imp32)], jnp.float32)}


def state_counts(prev_stored_mask, opt_state, options: EPIOptions | None = None
                 ) -> dict[str, Any]:
  """:func:`transition_counts` from the mask before a refresh (bool or packed, as
  in ``EPIState.mask`` or :func:`stored_mask_copy`) to ``opt_state``'s mask and importance,
  over the entries ``options`` (EPI's options) makes eligible (default: all)."""
  importance = inspection.epi_importance(opt_state)
  prev = jax.tree.map(lambda m, imp: refresh.as_bool(m, imp.shape, imp), prev_stored_mask,
                      importance)
  eligible = (None if options is None
              else [layout.eligible_mask(leaf) for leaf in layout.leaf_layout(options, importance)])
  return transition_counts(prev, inspection.unpacked_mask(opt_state), importance, eligible)


def stored_mask_copy(opt_state):
  """A copy of ``opt_state``'s mask as bits (1/8 byte per parameter, packed or
  not), kept across steps that donate the state; :func:`state_counts` reads it."""
  return jax.tree.map(lambda m: jnp.copy(m) if m.dtype == jnp.uint8 else compact.pack(m),
                      inspection.epi_state(opt_state).mask)


def _ratio(num, den):
  return None if not den else float(num) / float(den)


def refresh_stats(counts: Mapping[str, Any]) -> dict[str, float | None]:
  """``release_fraction`` and ``importance_ratio`` of one refresh's counts."""
  prev, entries = int(counts["prev_isolated"]), int(counts["entries"])
  mean_iso = _ratio(counts["importance_prev_isolated"], prev)
  mean_trainable = _ratio(counts["importance_prev_trainable"], entries - prev)
  ratio = (None if mean_iso is None or not mean_trainable
           else mean_iso / mean_trainable)
  return {"release_fraction": _ratio(counts["released"], prev), "importance_ratio": ratio,
          "isolated_fraction": _ratio(counts["isolated"], entries)}


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def lock_in_summary(records: Sequence[Mapping[str, Any]],
                    jaccard_vs_full: Sequence[float | None] | None = None) -> dict[str, Any]:
  """The run's lock-in statistics (module doc) from its refreshes' counts, in order.

  ``jaccard_vs_full``: per refresh, the mask's Jaccard against full SFT's
  top-p importance set at the same step (None where not known).
  """
  if not records:
    raise ValueError("lock_in_summary: no refresh records")
  per = [refresh_stats(r) for r in records]
  spells = int(records[0]["prev_isolated"]) + sum(int(r["entered"]) for r in records)
  spanned = sum(int(r["isolated"]) for r in records)
  out = {"num_refreshes": len(records),
         "release_fraction": [p["release_fraction"] for p in per],
         "importance_ratio": [p["importance_ratio"] for p in per],
         "isolated_fraction": [p["isolated_fraction"] for p in per],
         "mean_release_fraction": _mean(p["release_fraction"] for p in per),
         "mean_importance_ratio": _mean(p["importance_ratio"] for p in per),
         "mean_spell_refreshes": _ratio(spanned, spells),
         "ongoing_spell_share": _ratio(records[-1]["isolated"], spells)}
  if jaccard_vs_full is not None:
    if len(jaccard_vs_full) != len(records):
      raise ValueError(f"jaccard_vs_full has {len(jaccard_vs_full)} values for "
                       f"{len(records)} refreshes")
    out["jaccard_vs_full"] = list(jaccard_vs_full)
    out["mean_jaccard_vs_full"] = _mean(jaccard_vs_full)
  return out


def lock_in_stats(masks: Sequence[Any], importances: Sequence[Any], initial_mask=None,
                  jaccard_vs_full: Sequence[float | None] | None = None) -> dict[str, Any]:
  """:func:`lock_in_summary` of masks ``M_1..M_R`` and the importances ``I_1..I_R``
  their refreshes ranked (``initial_mask``: ``M_0``, default empty)."""
  if len(masks) != len(importances):
    raise ValueError(f"{len(masks)} masks but {len(importances)} importances")
  if not masks:
    raise ValueError("lock_in_stats: no masks")
  prev = (jax.tree.map(lambda m: np.zeros(np.shape(m), bool), masks[0])
          if initial_mask is None else initial_mask)
  records = []
  for mask, imp in zip(masks, importances):
    c = jax.device_get(transition_counts(prev, mask, imp))
    records.append(c)
    prev = mask
  return lock_in_summary(records, jaccard_vs_full)
