"""Differential privacy of the head pipeline's statistics, added on the sites (``head-dp-epsilon``).

What a site releases in a private run is the *increment* of its class statistics: the counts, sums and
scatter (:class:`fedal.heads.ClassStatistics`) of the labels it has not sent before, with noise the site
adds itself before the statistics leave it (before masking, under secure aggregation). The server adds the
increments up; the sums it holds, and the global statistics it sends back, are post-processing of
releases that were noisy when they left the sites. Each labeled sample is in one release (at most
``head-dp-releases``, when a reply did not reach the sum and its labels are sent again), so the
privacy of a sample does not degrade with the number of rounds, and no difference of two rounds' sums is
free of noise: the difference is the noisy increment itself.

Sensitivity. Every feature vector is clipped to norm ``C`` (``head-clip-norm``); one sample adds 1 to one
count, at most ``C`` (L2) to one class's sums and at most ``C^2`` (Frobenius) to the scatter. The three
blocks are scaled by ``sqrt(3)`` times their sensitivity, so that one sample moves the scaled vector by at
most 1 in L2, and the noise has standard deviation ``sigma`` (the noise multiplier) on every scaled entry:
``sigma sqrt(3)`` on a count, ``sigma sqrt(3) C`` on a sum, ``sigma sqrt(3) C^2`` on a scatter entry.

Who holds which noise.

* In the clear, every site adds the whole noise to its own increment: the server sees each increment
  with noise ``sigma``.
* Under secure aggregation (SecAgg+) the server sees one sum per round and a site sees the global
  statistics; each site adds a share, so that the shares of any ``k - 1`` of the ``k`` sites in the
  sum make up the whole noise: the guarantee holds against the server and against a curious site that
  knows its own share (``k``: the fewest sites a secure sum holds, :func:`fewest_in_sum`). The shares
  are integers on the secure encoding's grid (Skellam noise, the difference of two Poisson variables:
  a sum of Skellam variables is Skellam, so the sum carries exactly the noise the accountant counts;
  Agarwal, Kairouz & Liu, NeurIPS 2021).

Accounting: Renyi DP of the Gaussian mechanism, through Google's ``dp-accounting``
(:class:`RdpAccountant` at integer orders), and for the Skellam noise its Renyi bound (Agarwal et al.,
Corollary 3.6; integer orders), taken as a Gaussian of the smaller noise multiplier
(:func:`skellam_noise_multiplier`) that bounds it at every order the accountant uses. The guarantee is
sample-level, add-or-remove-one labeled sample of any site, over the whole run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from fedal.exceptions import ConfigError
from fedal.heads import ClassStatistics

#: integer Renyi orders: the Skellam bound holds at integer orders only, so the accountant uses these alone
ORDERS = tuple(range(2, 65)) + (72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024)
#: the secure grid: the noise a site's release carries faces its weakest observer with std 2^GRID_BITS steps
GRID_BITS = 20
#: the two parts of a private reply: the new labels' counts and sums, and the new pool samples' count, sum, scatter
LABELED, POOL = "stats", "pool"
#: each block's sensitivity to one sample, as a power of the clip norm C
BLOCK_POWER = {"counts": 0, "sums": 1, "scatter": 2}
#: the share of its part's privacy each block gets (the noise std of a block is sigma C^power / sqrt(share)). The
#: labels' part splits between counts and sums by :func:`count_share`; the covariance comes from the pool, whose
#: thousands of samples outweigh its noise
BLOCK_SHARE = {f"{LABELED}.counts": None, f"{LABELED}.sums": None,
               f"{POOL}.counts": 0.05, f"{POOL}.sums": 0.15, f"{POOL}.scatter": 0.8}


def count_share(dim: int) -> float:
    """The labels' counts' share of their part: ``1 / (1 + sqrt(dim))``, which makes the class means' expected error
    smallest (a mean is a sum of ``dim`` noisy entries over a noisy count: the sums weigh ``sqrt(dim)`` times more)."""
    return 1.0 / (1.0 + math.sqrt(max(int(dim), 1)))
#: the pool's release has this many times the labels' noise multiplier (it costs a quarter of a label release)
POOL_NOISE = 2.0
ACCOUNTING_METHOD = "Renyi DP (dp-accounting RdpAccountant, integer orders)"


def part_of(key: str) -> str:
    """The part (:data:`LABELED` or :data:`POOL`) of a private reply's array ``key``, e.g. ``pool.scatter``."""
    if key not in BLOCK_SHARE:
        raise ValueError(f"{key!r} is not an array of a private reply ({', '.join(BLOCK_SHARE)})")
    return key.split(".", 1)[0]


def fewest_in_sum(sampled: int, threshold: float) -> int:
    """The fewest sites a secure sum of ``sampled`` sites can hold: SecAgg+ unmasks a sum only while
    ``secure-threshold`` of a site's neighbours (every other sampled site) remain."""
    return max(2, math.ceil(threshold * sampled - 1e-9))


@dataclass(frozen=True)
class StatisticsNoise:
    """The noise of one private run's releases (the same on every site and on the server).

    Parameters
    ----------
    noise_multiplier : float
        ``sigma`` of the labels' part: noise std over sensitivity, as the weakest observer of a release faces it
        (the pool's part has :data:`POOL_NOISE` times it).
    clip_norm : float
        ``C``, the norm every feature vector is clipped to.
    fewest_sites : int
        Under secure aggregation the fewest sites a sum holds (:func:`fewest_in_sum`); 1 in the clear.
    dim : int
        Features per sample (the labels' counts' share of the noise follows from it, :func:`count_share`).
    labeled_clip : float
        The norm the labels' feature vectors, centred on the pools' mean, are clipped to (:func:`centring`).
    """

    noise_multiplier: float
    clip_norm: float
    fewest_sites: int = 1
    dim: int = 1
    #: the norm the labels' centred feature vectors are clipped to (:func:`centring`); 0 = not known yet
    labeled_clip: float = 0.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"the noise multiplier must be > 0, got {self.noise_multiplier}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"head-clip-norm must be > 0 for private statistics, got {self.clip_norm}")
        if self.fewest_sites < 1:
            raise ConfigError(f"fewest_sites must be >= 1, got {self.fewest_sites}")

    @property
    def secure(self) -> bool:
        """Whether the sites add shares of the noise to a secure sum (else each adds all of it)."""
        return self.fewest_sites >= 2

    def multiplier(self, part: str) -> float:
        """The noise multiplier of ``part`` (:data:`LABELED` or :data:`POOL`)."""
        return self.noise_multiplier * (POOL_NOISE if part == POOL else 1.0)

    def std(self, key: str) -> float:
        """The noise std of one entry of the array ``key`` that the weakest observer faces (real units)."""
        leaf, part = key.rsplit(".", 1)[-1], part_of(key)
        clip = self.labeled_clip if part == LABELED and self.labeled_clip > 0 else self.clip_norm
        return self.multiplier(part) * clip ** BLOCK_POWER[leaf] / math.sqrt(self.share(key))

    def centred(self, centre: "Centre | None") -> "StatisticsNoise":
        """This noise with the labels' clip norm of ``centre`` (unchanged while there is none)."""
        return self if centre is None else dataclasses.replace(self, labeled_clip=centre.clip)

    def share(self, key: str) -> float:
        """The share of its part's privacy the array ``key`` gets."""
        if key == f"{LABELED}.counts":
            return count_share(self.dim)
        if key == f"{LABELED}.sums":
            return 1.0 - count_share(self.dim)
        return BLOCK_SHARE[key]

    def share_std(self, key: str) -> float:
        """The std a site adds to one entry of ``key``: all of it in the clear, a share under secure aggregation
        (any ``fewest_sites - 1`` shares make the whole)."""
        return self.std(key) / (math.sqrt(self.fewest_sites - 1) if self.secure else 1.0)

    def sum_variance(self, key: str, sites: int) -> float:
        """The noise variance of one entry of ``key`` in a sum of ``sites`` sites' releases."""
        return sites * self.share_std(key) ** 2

    # ------------------------------------------------------------ the clear: continuous Gaussian
    def add_gaussian(self, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``arrays`` (a private reply) with this site's whole noise (the clear), drawn from ``rng``: Gaussian on every
        entry (the scatter's upper triangle, mirrored: one noise per distinct entry)."""
        out = {}
        for key, value in arrays.items():
            value = np.asarray(value, np.float64)
            if key.endswith(".scatter"):
                upper = np.triu(rng.normal(0.0, self.std(key), value.shape))
                out[key] = value + upper + np.triu(upper, 1).T
            else:
                out[key] = value + rng.normal(0.0, self.std(key), value.shape)
        return out

    # ------------------------------------------------------------ secure: Skellam on the integer grid
    def step(self, key: str) -> float:
        """The secure encoding's step of ``key`` in a private run: the whole noise is ``2^GRID_BITS`` steps."""
        return self.std(key) / 2.0 ** GRID_BITS

    def share_variance_steps(self) -> float:
        """The variance, in grid steps, of the Skellam share a site adds to each entry."""
        return share_variance_steps(self.fewest_sites)

    def skellam_share(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A site's integer noise share of ``size`` entries, drawn from ``rng`` (:func:`skellam_share`)."""
        return skellam_share(size, self.fewest_sites, rng)

    # ------------------------------------------------------------ accounting
    def effective_multiplier(self, part: str, entries: int) -> float:
        """The Gaussian noise multiplier whose Renyi DP bounds one release of ``part`` (``entries`` values): its
        multiplier in the clear; under secure aggregation the Skellam bound on the grid, with the rounding of each
        entry counted in the sensitivity, for a site that knows its own share (the server faces one share more)."""
        sigma = self.multiplier(part)
        return skellam_multiplier(sigma, entries, self.fewest_sites) if self.secure else sigma


def share_variance_steps(fewest_sites: int) -> float:
    """The variance, in grid steps, of the Skellam share each site adds to an entry, so that the shares of any
    ``fewest_sites - 1`` sites make the whole noise, ``2^GRID_BITS`` steps of std."""
    return 4.0 ** GRID_BITS / (fewest_sites - 1)


def skellam_share(size: int, fewest_sites: int, rng: np.random.Generator) -> np.ndarray:
    """A site's integer noise share of ``size`` entries, drawn from ``rng``, for sums of at least ``fewest_sites``
    sites: Poisson(v/2) - Poisson(v/2), of variance ``v`` = :func:`share_variance_steps`."""
    half = share_variance_steps(fewest_sites) / 2.0
    return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)


def skellam_multiplier(sigma: float, entries: int, fewest_sites: int) -> float:
    """The Gaussian noise multiplier whose Renyi DP bounds one secure release of ``entries`` values with noise
    multiplier ``sigma`` on the grid (the whole noise ``2^GRID_BITS`` steps), faced by a site that knows its own share
    (``fewest_sites - 1`` shares remain; the server faces one more): one unit of sensitivity is ``2^GRID_BITS / sigma``
    steps, and each entry's rounding moves it by at most one step more."""
    mu = (fewest_sites - 1) * share_variance_steps(fewest_sites)
    scale = 2.0 ** GRID_BITS / sigma
    l2 = scale + math.sqrt(entries)
    l1 = math.sqrt(entries) * scale + entries
    return skellam_noise_multiplier(l1, l2, mu)


@dataclass(frozen=True)
class UpdateNoise:
    """Distributed differential privacy of network updates under secure aggregation (``dp-clipping-norm`` and
    ``dp-noise-multiplier`` with ``secure-aggregation = true``).

    Each site clips its change of the weights to ``C`` (``dp-clipping-norm``) on the device, weighs it 1 (the mean
    of equal-weight updates, McMahan et al. 2018) and adds an integer Skellam share on the secure grid, sized so that
    the shares of any ``k - 1`` of the ``k`` sites in a sum make noise of std ``sigma C`` on every entry of the sum:
    the server unmasks a sum that was noisy before it left the sites, and a site that knows its own share still faces
    the noise of the others. One site's whole update moves the sum by at most ``C``: the guarantee is client-level
    (a site's whole data set, so every labeled sample of it), add-or-remove-one, per round, composed over the rounds.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: the noise std on the sum over the clipping norm, as the weakest observer faces it.
    clip_norm : float
        ``C``, the L2 norm each site's change of the weights is clipped to.
    fewest_sites : int
        The fewest sites a secure sum holds (:func:`fewest_in_sum`), at least 2.
    """

    noise_multiplier: float
    clip_norm: float
    fewest_sites: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"dp-noise-multiplier must be > 0, got {self.noise_multiplier}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"dp-clipping-norm must be > 0, got {self.clip_norm}")
        if self.fewest_sites < 2:
            raise ConfigError(f"distributed noise needs sums of at least 2 sites, got {self.fewest_sites}")

    def step(self) -> float:
        """The grid step of a weight's change: the whole noise, ``sigma C``, is ``2^GRID_BITS`` steps."""
        return self.noise_multiplier * self.clip_norm / 2.0 ** GRID_BITS

    def skellam_share(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A site's integer noise share of ``size`` entries, drawn from ``rng`` (:func:`skellam_share`)."""
        return skellam_share(size, self.fewest_sites, rng)

    def sum_std(self, sites: int) -> float:
        """The noise std of one entry of a sum of ``sites`` sites' updates, in the weights' units."""
        return self.step() * math.sqrt(sites * share_variance_steps(self.fewest_sites))

    def effective_multiplier(self, entries: int) -> float:
        """The Gaussian noise multiplier whose Renyi DP bounds one round's sum of updates of ``entries`` values."""
        return skellam_multiplier(self.noise_multiplier, entries, self.fewest_sites)


def network_noise(cfg) -> UpdateNoise | None:
    """The distributed noise of the network updates of the run ``cfg``, None unless it adds some
    (:attr:`fedal.config.FederationConfig.distributed_dp`)."""
    if not cfg.distributed_dp:
        return None
    sampled = max(int(cfg.clients * cfg.fraction_train), cfg.min_clients)
    return UpdateNoise(cfg.dp_noise_multiplier, cfg.dp_clipping_norm, fewest_in_sum(sampled, cfg.secure_threshold))


def release_due(labels: int, last_released: int, last_round: bool, growth: float = 1.5) -> bool:
    """Whether a round whose sites hold ``labels`` labels releases them (``last_released``: the labels at the last
    release, 0 before any; ``last_round``: the run's last): in the last round, at the first, and when they have
    grown ``growth`` times (``head-dp-release-growth``). The noise of the sums grows with the number of releases,
    so with the log of the rounds. On BloodMNIST at epsilon 8 and 1,000 labels the final head reached 0.60 with
    one release, 0.54 with 5, 0.51 with 9 (20 rounds at 1.5) and 0.44 with 20 (one per round)."""
    return labels > last_released and (last_round or last_released <= 0 or labels >= growth * last_released)


#: the labels' centred vectors are clipped to this many times the root of the pools' total variance
CENTRED_CLIP = 1.25


@dataclass(frozen=True)
class Centre:
    """Where a private run's labels are centred (``mean``) and how far they are clipped (``clip``): the pools' mean
    and :data:`CENTRED_CLIP` times the root of their total variance, both read from the pools' noisy sums (post-processing
    of their release, computed alike on the server and on every site from the global statistics)."""

    mean: np.ndarray
    clip: float

    def apply(self, X: np.ndarray) -> np.ndarray:
        """``X`` (already clipped to the run's norm) centred on the pools' mean and clipped to :attr:`clip`."""
        Z = np.asarray(X, np.float64) - self.mean
        if not len(Z):
            return Z
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        return Z * np.minimum(1.0, self.clip / np.maximum(norms, 1e-300))


#: the keys of the labels' centre in the global statistics the server sends (:func:`centring` reads them first)
CENTRE_MEAN, CENTRE_CLIP = "centre.mean", "centre.clip"


def centring(sums: dict[str, np.ndarray] | None, clip_norm: float) -> Centre | None:
    """The :class:`Centre` of the global statistics ``sums``: the one they carry (the server fixes it at the first
    release), else the pools' (None before the pools' release reached the sums, or while their noisy count is not
    positive); the clip is at most ``2 clip_norm`` (a centred vector's largest norm)."""
    if sums and CENTRE_MEAN in sums:
        return Centre(np.asarray(sums[CENTRE_MEAN], np.float64), float(np.asarray(sums[CENTRE_CLIP]).ravel()[0]))
    if not sums or f"{POOL}.counts" not in sums:
        return None
    n = float(np.asarray(sums[f"{POOL}.counts"]).ravel()[0])
    if not n > 1:
        return None
    mean = np.asarray(sums[f"{POOL}.sums"], np.float64).ravel() / n
    total = float(np.trace(np.asarray(sums[f"{POOL}.scatter"], np.float64))) / n - float(mean @ mean)
    clip = CENTRED_CLIP * math.sqrt(max(total, 1e-12))
    return Centre(mean, float(min(max(clip, 1e-6 * clip_norm), 2.0 * clip_norm)))


def skellam_rdp(order: int, l1: float, l2: float, mu: float) -> float:
    """Renyi DP at integer ``order`` of adding Skellam noise of variance ``mu`` per entry to an integer vector of L1
    and L2 sensitivity ``l1``, ``l2`` (Agarwal, Kairouz & Liu 2021, Cor. 3.6: ``a l2^2 / (2 mu)`` plus the smaller of
    two surcharges; this takes the first, ``((2a - 1) l2^2 + 6 l1) / (4 mu^2)``, never below the smaller one and
    additive over the parts of a reply, so releases can be composed part by part)."""
    a = order
    return a * l2 * l2 / (2 * mu) + ((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu)


def skellam_noise_multiplier(l1: float, l2: float, mu: float) -> float:
    """The largest Gaussian noise multiplier ``s`` whose Renyi DP ``a / (2 s^2)`` is at least the Skellam bound
    (L1 and L2 sensitivity ``l1``, ``l2``, variance ``mu`` per entry) at every order of :data:`ORDERS`: composing a
    Gaussian of ``s`` bounds the Skellam release."""
    return min(math.sqrt(a / (2.0 * skellam_rdp(a, l1, l2, mu))) for a in ORDERS)


def epsilon(events, delta: float) -> float:
    """Epsilon at ``delta`` of composing ``events``, ``[(Gaussian noise multiplier, releases), ...]`` (dp-accounting's
    Renyi accountant at :data:`ORDERS`)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    composed = False
    for multiplier, count in events:
        if count > 0:
            accountant.compose(dp_accounting.GaussianDpEvent(float(multiplier)), int(count))
            composed = True
    return float(accountant.get_epsilon(float(delta))) if composed else 0.0


def released_entries(n_classes: int, dim: int) -> dict[str, int]:
    """How many values each part of a private reply holds for ``n_classes`` classes of ``dim`` features: the labels'
    counts and sums; the pool's count, sum and scatter (its upper triangle)."""
    return {LABELED: n_classes + n_classes * dim, POOL: 1 + dim + dim * (dim + 1) // 2}


def sample_events(noise: StatisticsNoise, label_releases: int, entries: dict[str, int], pool_releases: int = 1):
    """The releases of ``noise`` one labeled sample is in, as accountant events: ``label_releases`` of the labels'
    part and ``pool_releases`` of the pool's, of ``entries`` values per part."""
    return [(noise.effective_multiplier(LABELED, entries[LABELED]), label_releases),
            (noise.effective_multiplier(POOL, entries[POOL]), pool_releases)]


def sample_epsilon(noise: StatisticsNoise, label_releases: int, delta: float, entries: dict[str, int],
                   pool_releases: int = 1) -> float:
    """The epsilon at ``delta`` of one labeled sample in ``label_releases`` label releases and ``pool_releases`` pool
    releases of ``noise``, each of ``entries`` values per part (:func:`released_entries`)."""
    return epsilon(sample_events(noise, label_releases, entries, pool_releases), delta)


def noise_for_epsilon(target: float, releases: int, delta: float, clip_norm: float, fewest_sites: int,
                      entries: dict[str, int], dim: int = 1) -> float:
    """The smallest noise multiplier whose :func:`sample_epsilon` with ``releases`` label releases (and as many of
    the pool) stays within ``target`` at ``delta``, for features clipped to ``clip_norm`` in ``dim`` dimensions,
    releases of ``entries`` values (:func:`released_entries`) and secure sums of at least ``fewest_sites`` sites.
    Computed once per settings (every site and the server ask for it with every message)."""
    return _noise_for(float(target), int(releases), float(delta), float(clip_norm), int(fewest_sites),
                      tuple(sorted(entries.items())), int(dim))


@functools.lru_cache(maxsize=64)
def _noise_for(target: float, releases: int, delta: float, clip_norm: float, fewest_sites: int,
               entries_items: tuple, dim: int) -> float:
    entries = dict(entries_items)
    if not (target > 0 and math.isfinite(target)):
        raise ConfigError(f"head-dp-epsilon must be > 0, got {target}")

    def spent(sigma: float) -> float:
        return sample_epsilon(StatisticsNoise(sigma, clip_norm, fewest_sites, dim), releases, delta, entries,
                              pool_releases=releases)

    low, high = 1e-3, 1.0
    while spent(high) > target:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ConfigError(f"head-dp-epsilon {target} at delta {delta} needs more noise than any run can use")
    for _ in range(60):  # bisection on a monotone function
        mid = math.sqrt(low * high)
        if spent(mid) > target:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-6:
            break
    return high


def planned_releases(cfg) -> int:
    """The most releases one sample of the run ``cfg`` is in: under secure aggregation one (a reply outside the sum
    was never unmasked, so sending it again releases nothing more), in the clear ``head-dp-releases``."""
    return 1 if cfg.secure_aggregation else int(cfg.head_dp_releases)


def run_noise(cfg, n_classes: int, dim: int) -> StatisticsNoise | None:
    """The noise of the private run ``cfg`` (a :class:`fedal.config.FederationConfig`) for statistics of
    ``n_classes`` classes of ``dim`` features, None when the run is not private.

    The noise multiplier is ``head-dp-noise``, or the smallest that keeps a labeled sample's releases
    (:func:`planned_releases`, of its label and of its pool) within ``head-dp-epsilon`` at ``dp-delta``. Under secure aggregation the shares
    are sized for the fewest sites a sum can hold (``secure-threshold`` of the sites sampled per round)."""
    if not cfg.head_private:
        return None
    fewest = 1
    if cfg.secure_aggregation:
        sampled = max(int(cfg.clients * cfg.fraction_train), cfg.min_clients)
        fewest = fewest_in_sum(sampled, cfg.secure_threshold)
    sigma = cfg.head_dp_noise
    if sigma <= 0:
        sigma = noise_for_epsilon(cfg.head_dp_epsilon, planned_releases(cfg), cfg.dp_delta, cfg.head_clip_norm, fewest,
                                  released_entries(n_classes, dim), dim)
    return StatisticsNoise(sigma, cfg.head_clip_norm, fewest, dim)
