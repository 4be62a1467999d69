"""Fixed-point encoding of what a site sends under secure aggregation (``secure-aggregation = true``).

Flower's SecAgg+ sums vectors of integers modulo 2^32 (each site's vector masked so that only the
sum can be read); fedal gives it integers that sum *exactly*, so the securely aggregated model is
the model of the summed fixed-point values, with no error beyond the rounding of each site's
value to the step below. Nothing here is cryptography: the masking, the key agreement and the
secret sharing are Flower's (:mod:`clients.secure`, :mod:`server.secure`).

What is summed, per array of a site's reply (:func:`kind_of` tells by the key):

* class statistics (``*.counts``, ``*.sums``, ``*.scatter`` of :class:`fedal.heads.ClassStatistics`):
  the values themselves, so the server gets the federation's sums (the scatter's upper triangle
  only: it is symmetric);
* anything else (network weights, their buffers, the hand-over's serving flag): ``n x (w - g)``,
  the site's change of the global value ``g`` it was sent, L2-clipped on the device to
  ``clip_norm`` over all such arrays and weighted by its ``n`` labeled samples, so that the server
  gets FedAvg's ``g + sum n (w - g) / sum n`` from the sum.

Each value is rounded to a multiple of its kind's step, ``bound / 2^59``, where ``bound`` is what one
site's entry can reach (:meth:`FixedPoint.bound`): counts ``max_count`` (counts are exact), sums
``max_count x C``, scatter ``max_count x C^2`` (``C``: the largest norm of a feature vector, which the
site clips to), weighted changes ``max_count x clip_norm``. With the defaults (``max_count`` 2^20, so a
step of ``bound / max_count x 2^-39``; descriptors' ``C`` about 5; ``clip_norm`` 100) the scatter's
step is 4.7e-11 and a weighted weight change's 1.8e-10, far below float32 training noise (a 40-bit
range was not enough: the head's LDA solve moved digits' accuracy by a point). The integer is split into three 20-bit limbs (``|value| <
2^60``) that Flower's quantiser carries exactly (a clipping range of 2^21 makes its grid the
integers) and whose sums over up to :data:`MAX_SITES` sites fit its 32-bit modulus. A value outside
the range is an error on the device, never a silent clip.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedal.dp import BLOCK_SHARE
from fedal.exceptions import ConfigError

#: bits of one limb, limbs of a value, and bits of the signed fixed-point value
LIMB_BITS = 20
LIMBS = 3
VALUE_BITS = LIMBS * LIMB_BITS
#: a value's range is a quarter of the 40-bit range: rounding can never leave it
STEP_BITS = VALUE_BITS - 1
#: Flower's SecAgg+ settings that make its quantiser carry integers exactly: values in
#: [-2^21, 2^21] on a grid of step 1, masked modulo 2^32
CLIPPING_RANGE = float(2 ** 21)
QUANTIZATION_RANGE = 2 ** 22
MODULUS_RANGE = 2 ** 32
#: sites one secure sum can hold: Flower adds a weight of 2^22 per site to the 2^32 modulus
MAX_SITES = MODULUS_RANGE // QUANTIZATION_RANGE - 1
#: the kinds of summed arrays
COUNT, SUM, SCATTER, CHANGE = "count", "sum", "scatter", "change"


def kind_of(key: str) -> str:
    """How the array ``key`` of a reply is summed: class statistics as they are, the rest as changes."""
    leaf = key.rsplit(".", 1)[-1] if "." in key else ""
    return {"counts": COUNT, "sums": SUM, "scatter": SCATTER}.get(leaf, CHANGE)


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point encoding of one run (the same on every site and on the server).

    Parameters
    ----------
    max_count : int
        The most samples (labeled plus self-trained) a site's statistics may count, and the most labels a
        network update may be weighted by (``secure-max-count``).
    feature_bound : float
        The largest L2 norm of a feature vector in the statistics (the site clips to it); 0 when no
        statistics are sent.
    clip_norm : float
        The L2 norm a site's change of the weights is clipped to (``secure-clip-norm``).
    noise : StatisticsNoise, optional
        A private run's noise (:mod:`fedal.dp`): its arrays are encoded on the noise's grid.
    noise_rng : numpy.random.Generator, optional
        On a site of a private run: where its Skellam share of the noise is drawn from (None on the server).
    update_noise : UpdateNoise, optional
        Distributed DP of network updates (:class:`fedal.dp.UpdateNoise`): the weights' changes are encoded on its
        grid and, on a site (``noise_rng``), carry its Skellam share.
    equal_weights : bool
        Every site's change weighs 1 instead of its labeled samples (differential privacy: ``clip_norm`` is then the
        sensitivity of the sum to one site), and the server divides the sum by the sites in it.
    """

    max_count: int
    feature_bound: float
    clip_norm: float
    #: a private run's noise (:mod:`fedal.dp`): its arrays are encoded on the noise's grid (:meth:`key_step`)
    noise: object = None
    #: on a site of a private run: where its Skellam share of the noise is drawn from (None on the server)
    noise_rng: object = field(default=None, compare=False, repr=False)
    #: distributed DP of network updates (:class:`fedal.dp.UpdateNoise`): the changes' grid and noise shares
    update_noise: object = None
    #: every site's change weighs 1 (differential privacy), the server divides the sum by the sites in it
    equal_weights: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_count < 2 ** 31:
            raise ConfigError(f"secure-max-count must be in [1, 2^31), got {self.max_count}")
        if not (self.feature_bound >= 0 and math.isfinite(self.feature_bound)):
            raise ConfigError(f"the feature bound of secure aggregation must be >= 0, got {self.feature_bound}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"secure-clip-norm must be > 0, got {self.clip_norm}")

    def bound(self, kind: str) -> float:
        """The largest absolute value one site's entry of ``kind`` may have."""
        c = self.feature_bound
        return float(self.max_count * {COUNT: 1.0, SUM: c, SCATTER: c * c, CHANGE: self.clip_norm}[kind])

    def step(self, kind: str) -> float:
        """The quantisation step of ``kind``: each site's entry is rounded to a multiple of it (an error of at most
        half a step per site, so at most ``sites x step / 2`` in a sum)."""
        return self.bound(kind) / 2.0 ** STEP_BITS

    def key_step(self, key: str) -> float:
        """The step of the array ``key``: its kind's (:meth:`step`), or in a private run the noise's grid for the
        arrays the noise covers (the whole noise is 2^20 steps, so rounding is a millionth of it)."""
        if self.noise is not None and key in BLOCK_SHARE:
            return self.noise.step(key)
        if self.update_noise is not None and kind_of(key) == CHANGE:
            return self.update_noise.step()
        return self.step(kind_of(key))

    # ------------------------------------------------------------------ device side
    def encode(self, arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], weight: int,
               on_clip: Callable[[float], None] | None = None,
               noise_out: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """The :data:`LIMBS` limb vectors, highest first (float64 holding integers), of a site's reply ``arrays``.

        Parameters
        ----------
        arrays : mapping
            The reply's arrays (statistics and / or weights), keyed as the server's reference.
        sent : mapping
            The global model the site was sent (the weights' changes are taken from it).
        weight : int
            The site's labeled samples, the weight of its change in FedAvg (1 with ``equal_weights``).
        on_clip : callable, optional
            Called with the change's L2 norm when ``clip_norm`` clips it (the sum is then not FedAvg's mean of the
            site's own weights).
        noise_out : dict, optional
            Private run: filled with this site's noise share per array, in real units (what a curious site knows
            of its own noise; the attack tests use it).
        """
        if not 0 <= weight <= self.max_count:
            raise ValueError(f"this site's {weight} labeled samples exceed secure-max-count {self.max_count}: the "
                             "federation's coordinator must raise it (it bounds every site's contribution)")
        keys = sorted(arrays)
        for key in keys:
            if not np.all(np.isfinite(np.asarray(arrays[key], dtype=np.float64))):
                raise ValueError(f"array {key!r} of this site's update holds NaN or Inf: it is not sent")
        if self.equal_weights:
            weight = 1
        changes = _changes(arrays, sent)
        norm = _norm(changes)
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0  # bounded on the device
        if norm > self.clip_norm and on_clip is not None:
            on_clip(norm)
        parts = []
        for key in keys:
            kind = kind_of(key)
            value = changes[key] * (scale * weight) if kind == CHANGE else np.asarray(arrays[key], np.float64)
            flat = _upper(value) if kind == SCATTER else value.ravel()
            fixed = np.rint(flat / self.key_step(key))
            source = self._noise_source(key)
            if source is not None:
                share = source.skellam_share(fixed.size, self.noise_rng)  # this site's share, before masking
                fixed = fixed + share
                if noise_out is not None:
                    noise_out[key] = share * self.key_step(key)
            if fixed.size and np.max(np.abs(fixed)) > 2.0 ** STEP_BITS:
                raise ValueError(f"array {key!r} of this site's update exceeds the secure aggregation range "
                                 f"(|value| <= {self.bound(kind):g}): raise secure-max-count, or clip the features "
                                 "(head-clip-norm)")
            parts.append(fixed.astype(np.int64))
        value = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        limbs = []
        for _ in range(LIMBS - 1):  # low limbs in [0, 2^20), the top one signed
            low = value & ((1 << LIMB_BITS) - 1)
            limbs.append(low)
            value = (value - low) >> LIMB_BITS
        limbs.append(value)
        return [limb.astype(np.float64) for limb in reversed(limbs)]

    def _noise_source(self, key: str):
        """What adds this site's noise share to the array ``key`` (None: no noise, or not on a site)."""
        if self.noise_rng is None:
            return None
        if self.noise is not None and key_is_noised(key):
            return self.noise
        if self.update_noise is not None and kind_of(key) == CHANGE:
            return self.update_noise
        return None

    # ------------------------------------------------------------------ server side
    def encoded_size(self, reference: Mapping[str, np.ndarray]) -> int:
        """The length of each limb vector :meth:`encode` makes of an update keyed as ``reference``."""
        return sum(_size(np.shape(reference[k]), kind_of(k)) for k in reference)

    def decode(self, limb_sums: list[np.ndarray], reference: Mapping[str, np.ndarray], total_weight: int
               ) -> "OrderedDict[str, np.ndarray]":
        """The aggregate of the summed limbs (exact integers, highest first): class statistics summed, weights
        ``g + sum n (w - g) / sum n`` with ``g`` the global ``reference`` value (unchanged if ``total_weight`` is 0).

        Parameters
        ----------
        limb_sums : list of LIMBS arrays
            The federation's sums of the sites' :meth:`encode` vectors.
        reference : mapping
            Every key of the replies with, for weights, the global value sent (its shape and dtype), for
            statistics an array of their shape.
        total_weight : int
            The summed labeled samples of the sites in the sum (with ``equal_weights``: the sites in the sum).
        """
        if len(limb_sums) != LIMBS:
            raise ValueError(f"the secure sum holds {len(limb_sums)} vectors, not the {LIMBS} limbs of fedal's encoding")
        value = np.zeros(np.shape(limb_sums[0]))
        for limb in limb_sums:  # in float64: a sum of 1,000 sites' 60-bit values needs 70 bits
            value = value * float(1 << LIMB_BITS) + np.rint(np.asarray(limb, np.float64))
        sizes = {k: _size(np.shape(reference[k]), kind_of(k)) for k in sorted(reference)}
        if value.shape != (sum(sizes.values()),):
            raise ValueError(f"the secure sum holds {value.size} values; the model's update has {sum(sizes.values())}")
        out, offset = OrderedDict(), 0
        for key in sorted(reference):
            kind, ref = kind_of(key), np.asarray(reference[key])
            part = value[offset: offset + sizes[key]] * self.key_step(key)
            offset += sizes[key]
            if kind == SCATTER:
                out[key] = _symmetric(part, ref.shape[0])
            elif kind == CHANGE:
                mean = ref.astype(np.float64) + (part.reshape(ref.shape) / total_weight if total_weight > 0 else 0.0)
                out[key] = (np.rint(mean) if np.issubdtype(ref.dtype, np.integer) else mean).astype(ref.dtype)
            else:
                out[key] = part.reshape(ref.shape)
        return OrderedDict((k, out[k]) for k in reference)


def key_is_noised(key: str) -> bool:
    """Whether a private run's noise covers the array ``key`` (:data:`fedal.dp.BLOCK_SHARE`)."""
    return key in BLOCK_SHARE


def _changes(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key in sorted(arrays):
        if kind_of(key) == CHANGE:
            if key not in sent:
                raise ValueError(f"array {key!r} of this site's update was not in the model it was sent")
            out[key] = np.asarray(arrays[key], np.float64) - np.asarray(sent[key], np.float64)
    return out


def _norm(changes: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(d * d)) for d in changes.values()))


def _size(shape: tuple[int, ...], kind: str) -> int:
    if kind == SCATTER:
        d = shape[0]
        return d * (d + 1) // 2
    return int(np.prod(shape, dtype=np.int64))


def _upper(matrix: np.ndarray) -> np.ndarray:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a scatter matrix must be square, got shape {matrix.shape}")
    return matrix[np.triu_indices(matrix.shape[0])]


def _symmetric(upper: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((d, d))
    rows, cols = np.triu_indices(d)
    out[rows, cols] = upper
    out[cols, rows] = upper
    return out


def renew_released(labels: Mapping[int, int], released: Mapping[int, list[int]], min_count: int
                   ) -> dict[int, list[int]]:
    """Which labeled samples a site's clear statistics hold this round (``min-class-count``), per class.

    A class's released set is renewed to the class's current labeled samples only when at least ``min_count``
    of them are not in it yet; otherwise it stays as it was. So a class appears only once it has
    ``min_count`` labels, and the difference between two rounds' statistics of a class always holds at least
    ``min_count`` new samples (a sample whose label was corrected stays in its old class until both classes
    renew).

    Parameters
    ----------
    labels : mapping
        Sample id -> label of the site's labeled set now.
    released : mapping
        Class -> sample ids of the last round's released set (empty the first time).
    min_count : int
        The fewest new samples that renew a class (1 = every class always current).
    """
    current: dict[int, set[int]] = {}
    for sample, label in labels.items():
        current.setdefault(int(label), set()).add(int(sample))
    out = {int(k): sorted(int(i) for i in v) for k, v in released.items() if v}
    for label, ids in current.items():
        if len(ids - set(out.get(label, ()))) >= max(min_count, 1):
            out[label] = sorted(ids)
    return out
