"""Federation settings: one dataclass, one source of defaults, validated.

The same settings come from ``fedal simulate`` flags, a TOML config file, or a Flower
run config (``[tool.flwr.app.config]`` / ``flwr run --run-config``), whose keys are the
field names written in kebab-case (``round-budget``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedal.exceptions import ConfigError, UnknownStrategyError
from fedal.features import FEATURES
from fedal.fileio import read_toml
from fedal.oracle import NOISE_KINDS

PARTITIONS = ("iid", "dirichlet", "pathological")
BUDGET_POLICIES = ("uniform", "pool", "uncertainty")
AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")
DP_MODES = ("server", "client")
PIPELINES = ("head", "network", "handover")
NETWORKS = ("smallcnn", "convnet")
#: how an image of another size or aspect is brought to the run's square input size (``resize-policy``)
RESIZE_POLICIES = ("pad", "crop")
#: ConvNet's normalisations (:data:`fedal.models.nets.NORMS` says what each is)
NORMS = ("batch", "group", "none")
#: optimizers of a local fit, learning-rate schedules within one fit, training-time augmentations of images
#: (kept here, not beside the torch code, so that reading settings imports no torch)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle")
AUGMENTATIONS = ("none", "shift", "shift-flip")
LR_SCHEDULES = ("constant", "cosine")
#: warm-up share of the rounds of ``lr-schedule = cosine``
WARMUP_SHARE = 0.1
#: a Ray cluster's address as ``ray-address`` takes it: HOST:PORT, or ray://HOST:PORT (Ray Client)
RAY_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-]+:[0-9]{1,5}|(ray://)?\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")
#: the one default of every cold start (the initial labeled set): runs, the on-device learner, comparisons
DEFAULT_COLD_START = "random"


@dataclass(frozen=True)
class FederationConfig:
    """Everything a federated active learning run needs.

    Attributes
    ----------
    dataset : str
        Data set name or ``.npz`` path (see :func:`fedal.data.load_dataset`).
    data_dir : str
        Folder with ``.npz`` files ("" = ``$FEDAL_DATA_DIR`` or ``./data``).
    max_train : int
        Subsample the training pool to this many samples before partitioning (0 = all).
    n_classes : int
        Number of classes of an .npz data set when some are absent from it on purpose (0 = from the labels).
    clients : int
        Number of clients (SuperNodes).
    partition : str
        ``iid``, ``dirichlet`` (label skew) or ``pathological`` (k classes per client).
    alpha : float
        Dirichlet concentration (smaller = more skewed).
    classes_per_client : int
        Classes per client for the pathological partition.
    local_test_fraction : float
        Share of each client's data kept out of its pool for local evaluation.
    pipeline : str
        ``head``: fixed features and a closed-form LDA head whose statistics the server sums (the same head as
        pooled training, whatever the skew); ``network``: a network (SmallCNN, ConvNet or MLP) trained by the
        clients and averaged by a Flower strategy; ``handover``: both, the head serving until the network is
        at least as accurate on the sites' local test sets (their aggregated accuracy), the network from then on
        (:mod:`server.handover`).
    features : str
        ``auto`` (image descriptors for images with the head pipeline, the inputs as they are otherwise),
        ``raw`` (the inputs flattened) or ``descriptors`` (HOG, LBP and intensity statistics of images).
    input_size : int
        Images: the side every image is brought to (0 = the data set's own: 28 for MedMNIST). A site's own files
        (a folder, :mod:`fedal.imagefolder`) are read at it, the server's test set and the simulated sites' images
        resized to it; 28, 64, 128 and 224 are the sizes the networks and descriptors are made for.
    site_data : str
        Simulation: where each client reads its own data instead of its share of ``dataset``, a path with ``{id}``
        for the client id (e.g. ``sites/site-{id}/pool``: a folder of image files, :mod:`fedal.imagefolder`, or a
        ``.npz`` of ``fedal split``); "" = the share. A deployed site's node config ``data-path`` overrides it.
    resize_policy : str
        How an image of another size or aspect is brought to ``input_size`` x ``input_size``: ``pad`` (the longer
        side to the size, black borders) or ``crop`` (the shorter side to the size, the centre kept).
    pseudo_label_threshold : float
        Head pipeline: pool samples the global head classifies with at least this confidence join a client's
        statistics with that class (self-training, on the device; 0 = off).
    head_shrinkage : float
        Head pipeline: covariance shrinkage in [0, 1] (-1 = dim / (dim + labels)).
    head_clip_norm : float
        Head pipeline: scale every feature vector to at most this L2 norm (0 = off); bounds one sample's share
        of the statistics, needed by head-dp-noise.
    head_dp_noise : float
        Head pipeline, private run (:mod:`fedal.dp`): the noise multiplier sigma that every site adds to the
        statistics of its new labels before they leave it (its share of it under secure aggregation); 0 = none.
        Give this or head-dp-epsilon.
    head_dp_epsilon : float
        Head pipeline, private run: the epsilon (at dp-delta) of each labeled sample over the whole run; the noise
        multiplier is the smallest that keeps head-dp-releases releases of a sample within it (0 = not private).
    head_dp_release_growth : float
        Private run: the labels are released when the federation holds this many times the labels of the last
        release (and in the last round); larger = fewer releases, less noise in the final sums, a staler head
        during the run (> 1).
    head_dp_releases : int
        Private run in the clear: the most replies one label may be in (1 + the times it is sent again because a
        reply did not reach the sums); a label that would need more is held back. Under secure aggregation a reply
        outside the sum was never unmasked: one release per sample, whatever this says.
    strategy : str
        Query strategy name (see ``fedal strategies``).
    strategy_options : str
        Options of the query strategy as key=value pairs separated by commas, e.g. ``n_samples=20`` for bald.
    initial_strategy : str
        How each client picks its initial labeled set: a strategy that needs no model (random, typiclust, kmeans_coldstart).
    initial_strategy_options : str
        Options of the initial strategy, written as strategy-options, e.g. ``k_neighbors=10`` for typiclust.
    initial_labels : int
        Initial labeled samples per client.
    budget_policy : str
        ``uniform``, ``pool`` or ``uncertainty`` (see :mod:`fedal.budget`).
    round_budget : int
        Labels the federation may request per query round, split among clients.
    client_cap : int
        Most labels one client may be asked for per query round (0 = no cap).
    rounds : int
        Federated learning rounds.
    query_every : int
        Query every k FL rounds (round 1 only labels the initial set and trains).
    reinit : bool
        Re-initialise the global model at each query round (else warm start).
    local_epochs : int
        Local epochs per round.
    min_local_steps : int
        At least this many local optimizer steps per round (more epochs on small labeled sets).
    batch_size : int
        Local training batch size.
    lr : float
        Local learning rate.
    local_optimizer : str
        Network pipeline: ``adam`` (a fresh Adam per round) or ``sgd`` (with batch-size >= the labels and
        min-local-steps 1: FedAvg is centralized gradient descent).
    restricted_softmax : float
        Network pipeline: FedRS factor in (0, 1] for the logits of classes a client has no label of (1 = off).
    network : str
        Network pipeline, images: ``smallcnn`` (two convolutions and a dense layer) or ``convnet`` (five
        convolutions, global average pooling; see norm). Tabular inputs always get an MLP.
    norm : str
        ``convnet``'s normalisation: ``group`` (GroupNorm on weight-standardised convolutions), ``none``
        (scaled weight standardisation) or ``batch`` (BatchNorm, whose batch statistics suffer under label skew).
    augment : str
        Network pipeline: training-time augmentation of images: ``auto`` (shifts of up to 2 px, and horizontal
        flips for data sets that do not change under them, such as blood cells), ``none``, ``shift``,
        ``shift-flip``.
    local_steps : int
        Network pipeline: exactly this many local optimizer steps per round (0 = local-epochs and
        min-local-steps); 1 step of SGD per round with a server optimiser (fedadam) is pooled training of a
        network without batch statistics.
    momentum : float
        Network pipeline: local SGD momentum (Nesterov; 0 = plain SGD).
    weight_decay : float
        Network pipeline: L2 weight decay of the local optimizer.
    consistency : float
        Network pipeline: weight of the consistency loss on the site's unlabeled pool (FixMatch: a pool image
        the network classifies with at least ``consistency-threshold`` confidence on a weakly augmented view is
        trained to that class on a strongly augmented view; 0 = off). The pool never leaves the site.
    consistency_threshold : float
        Network pipeline: the confidence a pseudo-label of the consistency loss needs.
    lr_schedule : str
        Network pipeline: ``constant``, or ``cosine``: the server scales the learning rate of each round
        (server-lr with fedadam, the clients' lr otherwise) by a linear warm-up over the first tenth of the rounds and a cosine decay to 0
        over the run's rounds.
    eval_every : int
        Evaluate the global model (and record a result row and a checkpoint) every k rounds, before each
        query round (and at it, with stop-when) and after the last round (1 = every round); hundreds of short
        rounds need not pay a test pass each. A k-th round just before one of the others is left out.
    aggregation : str
        Flower strategy: fedavg, fedprox, fedadam, fedavgm, fedmedian, fedtrimmedavg, krum.
    proximal_mu : float
        FedProx proximal weight (used with ``aggregation = fedprox``).
    server_lr : float
        Server learning rate for fedadam / fedavgm.
    server_momentum : float
        Server momentum for fedavgm.
    fraction_train : float
        Share of clients sampled per round.
    min_clients : int
        Fewest clients a round needs to go ahead, and the fewest usable replies its aggregation needs: a round
        with fewer keeps the global model (an event says why).
    min_reply_fraction : float
        Share of a round's sampled clients whose usable replies its aggregation needs as well (0 = min-clients
        alone; 1 = every sampled client).
    max_failed_rounds : int
        Rounds in a row not aggregated for want of replies after which the run stops with an error saying how
        to resume it (0 = never stop).
    round_timeout : float
        Seconds the server waits for replies in a round.
    noise_rate : float
        Simulated oracle label-noise rate (every client; see client-noise).
    noise_kind : str
        Simulated oracle noise: ``uniform`` (any wrong class) or ``neighbour`` (class y - 1 or y + 1).
    client_noise : str
        Per-client noise rates, comma-separated, one per client ("0,0,0.6"; "" = noise-rate for all): sites
        whose readers differ in reliability.
    unsure_rate : float
        Share of samples the simulated oracle answers "unsure" (the request closes, the sample is not asked again).
    verify_threshold : float
        A noise-robust measure: where an answer disagrees with a global model at least this confident, a second
        simulated reader of the site labels the sample and its answer is kept (0 = off; the second readings are
        counted and reported). With strategies that pick what the model is unsure of (entropy, margin,
        least_confidence, bald, qbc_*) the model is hardly ever that confident about a queried sample, so
        almost no second reading is made: pair it with random or a diversity strategy (badge, coreset).
    seed : int
        Seed of partitioning, initial sets, queries and training.
    output_dir : str
        Where results, checkpoints and (in simulation) client state are written.
    state_dir : str
        Client databases ("" = ``<output_dir>/clients``); a node config may override it.
    resume : bool
        Continue from the checkpoint in ``output_dir`` (model, round, budget ledger).
    overwrite : bool
        Replace a previous run found in ``output_dir`` (without it, or resume, a run there is refused).
    local_model_epochs : int
        Epochs of the client's local model for federated-aware strategies (logo, kafal); 0 = local-epochs.
    query_timeout : float
        Seconds a label request may wait for its oracle before it is released to the pool again (0 = never).
    stop_when : str
        Stop asking for labels when one of these criteria holds (comma-separated): plateau (global accuracy),
        uncertainty (mean pool uncertainty the clients report), budget (total-budget spent); "" = never.
    stop_patience : int
        Query rounds without an accuracy gain of stop-min-delta before plateau fires.
    stop_min_delta : float
        The accuracy gain that counts as progress for plateau.
    stop_uncertainty : float
        Mean pool uncertainty (normalised entropy, 0..1) below which uncertainty fires.
    offline_budget : int
        Labels a site may ask its people for on its own while the server is unreachable (``fedal site``),
        granted in advance with each train message; the server subtracts what was spent from the site's next
        shares (0 = a site asks nothing while offline; its people still answer the requests already open).
    total_budget : int
        Labels the whole run may have, the initial labels of every client included (clients x initial-labels),
        over all query rounds (0 = no cap); the last query round gets what is left.
    after_stop : str
        What a run does once a criterion fired: continue (rounds go on without queries) or end (a resume of a
        run that ended so does nothing; resume it with after-stop continue to train its remaining rounds).
    dp_clipping_norm : float
        Differential privacy: clip each client's model update to this L2 norm (0 = off).
    dp_noise_multiplier : float
        Differential privacy: Gaussian noise of std multiplier x clipping norm / sampled clients on the aggregate (0 = none).
    dp_mode : str
        Where updates are clipped: ``server`` (the server clips what it receives) or ``client`` (each client clips
        before sending). Under secure aggregation only ``client``, and the sites add the noise too: each adds an
        integer share before masking, so the sum the server unmasks is already noisy (:class:`fedal.dp.UpdateNoise`).
    dp_delta : float
        The delta at which the privacy budget epsilon is reported.
    secure_aggregation : bool
        Sum what the sites send with Flower's SecAgg+ protocol (:mod:`server.secure`): the server sees only the
        federation's sum of the statistics / weight changes, never one site's; the scalars of the report stay in
        the clear.
    secure_threshold : float
        SecAgg+: the share of a site's neighbours whose key shares rebuild its masks (the protocol survives
        fewer sites dropping out than the rest; a higher share resists more colluding sites).
    secure_clip_norm : float
        Secure aggregation of networks: each site clips its change of the weights to this L2 norm on the device
        (it bounds what one site can do to the sum the server can no longer screen).
    secure_max_count : int
        Secure aggregation: the most samples one site's statistics may count (labeled and self-trained) and the
        most labels a network update is weighted by; with the feature and clip norms it sets the fixed-point
        steps (:mod:`fedal.secure`).
    min_class_count : int
        Head and hand-over pipelines without secure aggregation: a site sends a class's labeled statistics only
        once it holds this many labels of the class, and renews them only when as many new ones came, so no
        statistic the server reads (or a difference of two rounds) is of fewer samples; classes below the
        count wait on the device (-1 = 2 without secure aggregation, off with it; 0 or 1 = off).
    ray_address : str
        Simulation: the Ray cluster the client actors run on: "" (``$RAY_ADDRESS`` where set, else a Ray started on
        this machine for the run), ``local`` (always a Ray of this machine's own), ``auto`` (the cluster ``ray start``
        started on this machine) or the head's ``HOST:PORT`` (e.g. ``10.0.0.5:6379``). Every node needs fedal's
        Python environment and the data dir, output-dir and state-dir at the same paths (docs/CLUSTER.md).
    actor_cpus : float
        Simulation: CPUs Ray reserves for each client actor (an actor serves one client at a time; a node holds as
        many actors as its CPUs allow).
    actor_gpus : float
        Simulation: GPUs Ray reserves for each client actor (a fraction shares one GPU, e.g. 0.25 for four actors;
        0 = none): a node holds no more actors than its GPUs allow, and an actor is placed only where one is free.
    actor_memory_gib : float
        Simulation: memory (GiB) Ray reserves for each client actor, so a node holds no more actors than its memory
        allows (0 = no reservation: as many as its CPUs and GPUs allow).
    """

    dataset: str = "digits"
    data_dir: str = ""
    max_train: int = 0
    n_classes: int = 0
    clients: int = 5
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    local_test_fraction: float = 0.2
    pipeline: str = "head"
    features: str = "auto"
    input_size: int = 0
    resize_policy: str = "pad"
    site_data: str = ""
    pseudo_label_threshold: float = 0.9
    head_shrinkage: float = -1.0
    head_clip_norm: float = 0.0
    head_dp_noise: float = 0.0
    head_dp_epsilon: float = 0.0
    head_dp_releases: int = 2
    head_dp_release_growth: float = 1.5
    strategy: str = "entropy"
    strategy_options: str = ""
    initial_strategy: str = DEFAULT_COLD_START
    initial_strategy_options: str = ""
    initial_labels: int = 10
    budget_policy: str = "uniform"
    round_budget: int = 50
    client_cap: int = 0
    rounds: int = 8
    query_every: int = 1
    reinit: bool = False
    local_epochs: int = 10
    min_local_steps: int = 50
    batch_size: int = 32
    lr: float = 0.003
    local_optimizer: str = "adam"
    restricted_softmax: float = 1.0
    network: str = "smallcnn"
    norm: str = "group"
    augment: str = "auto"
    local_steps: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    consistency: float = 0.0
    consistency_threshold: float = 0.95
    lr_schedule: str = "constant"
    eval_every: int = 1
    aggregation: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_momentum: float = 0.9
    fraction_train: float = 1.0
    min_clients: int = 2
    min_reply_fraction: float = 0.0
    max_failed_rounds: int = 10
    round_timeout: float = 600.0
    noise_rate: float = 0.0
    noise_kind: str = "uniform"
    client_noise: str = ""
    unsure_rate: float = 0.0
    verify_threshold: float = 0.0
    seed: int = 0
    output_dir: str = "runs/latest"
    state_dir: str = ""
    resume: bool = False
    overwrite: bool = False
    local_model_epochs: int = 0
    query_timeout: float = 0.0
    stop_when: str = ""
    stop_patience: int = 3
    stop_min_delta: float = 0.005
    stop_uncertainty: float = 0.1
    total_budget: int = 0
    offline_budget: int = 0
    after_stop: str = "continue"
    dp_clipping_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_mode: str = "server"
    dp_delta: float = 1e-5
    secure_aggregation: bool = False
    secure_threshold: float = 0.6
    secure_clip_norm: float = 100.0
    secure_max_count: int = 2 ** 20
    min_class_count: int = -1
    ray_address: str = ""
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    actor_memory_gib: float = 0.0

    def __post_init__(self) -> None:
        # names and options are stored in one spelling: "Entropy" and "entropy" are one run
        for name in ("strategy", "initial_strategy"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, canonical_name(getattr(self, name)))
        for name in ("strategy_options", "initial_strategy_options"):
            object.__setattr__(self, name, format_options(parse_options(getattr(self, name), name)))
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> "FederationConfig":
        """Raise :class:`ConfigError` naming the first bad value and the fix."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.clients >= 1, f"clients must be >= 1, got {self.clients}")
        need(self.pipeline in PIPELINES, f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        need(self.features in FEATURES, f"features must be one of {FEATURES}, got {self.features!r}")
        need(self.input_size == 0 or 8 <= self.input_size <= 512, f"input-size must be 0 (the data set's own) or a "
             f"side in 8..512 pixels (28, 64, 128, 224), got {self.input_size}")
        need(not self.site_data or "{id}" in self.site_data, f"site-data must hold {{id}} where the client id goes "
             f"(e.g. \"sites/site-{{id}}/pool\"), got {self.site_data!r}")
        need(self.resize_policy in RESIZE_POLICIES, f"resize-policy must be one of {RESIZE_POLICIES} (pad: the longer "
             f"side to input-size with black borders; crop: the shorter side, centre kept), got {self.resize_policy!r}")
        need(0 <= self.pseudo_label_threshold <= 1,
             f"pseudo-label-threshold must be in [0, 1] (0 = no self-training), got {self.pseudo_label_threshold}")
        need(self.head_shrinkage == -1 or 0 <= self.head_shrinkage <= 1,
             f"head-shrinkage must be in [0, 1], or -1 for dim / (dim + labels), got {self.head_shrinkage}")
        need(self.partition in PARTITIONS, f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        need(self.alpha > 0 and math.isfinite(self.alpha),
             f"alpha must be a finite number > 0 (try 0.1 for strong skew, 100 for near-IID; partition = iid for "
             f"identical clients), got {self.alpha}")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other: continue the run in "
             "output-dir, or replace it")
        need(self.classes_per_client >= 1, f"classes-per-client must be >= 1, got {self.classes_per_client}")
        need(0 <= self.local_test_fraction < 1, f"local-test-fraction must be in [0, 1), got {self.local_test_fraction}")
        self.query_strategy()
        need(not self.cold_start_strategy().needs_model,
             f"initial-strategy must be a strategy that needs no model (nothing is labeled yet): one of "
             f"{', '.join(model_free_strategies())}, got {self.initial_strategy!r}")
        need(self.initial_labels >= 1, f"initial-labels must be >= 1 (each client needs labels to train on), got {self.initial_labels}")
        need(self.budget_policy in BUDGET_POLICIES,
             f"budget-policy must be one of {BUDGET_POLICIES}, got {self.budget_policy!r}")
        need(self.round_budget >= 0, f"round-budget must be >= 0 (0 = no queries), got {self.round_budget}")
        need(self.client_cap >= 0, f"client-cap must be >= 0 (0 = no cap), got {self.client_cap}")
        need(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        need(self.query_every >= 1, f"query-every must be >= 1, got {self.query_every}")
        need(self.local_epochs >= 1, f"local-epochs must be >= 1, got {self.local_epochs}")
        need(self.min_local_steps >= 0, f"min-local-steps must be >= 0, got {self.min_local_steps}")
        need(self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.local_optimizer in OPTIMIZERS,
             f"local-optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.local_optimizer!r}")
        need(self.network in NETWORKS, f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        need(self.augment in ("auto", *AUGMENTATIONS),
             f"augment must be one of auto, {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        need(self.local_steps >= 0, f"local-steps must be >= 0 (0 = local-epochs), got {self.local_steps}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}")
        need(self.consistency >= 0, f"consistency must be >= 0 (0 = off), got {self.consistency}")
        need(0 < self.consistency_threshold <= 1,
             f"consistency-threshold must be in (0, 1], e.g. 0.95, got {self.consistency_threshold}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        need(self.eval_every >= 1, f"eval-every must be >= 1 round, got {self.eval_every}")
        need(0 < self.restricted_softmax <= 1,
             f"restricted-softmax must be in (0, 1] (1 = off), got {self.restricted_softmax}")
        need(self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        need(self.proximal_mu >= 0, f"proximal-mu must be >= 0, got {self.proximal_mu}")
        need(self.server_lr > 0, f"server-lr must be > 0, got {self.server_lr}")
        need(0 <= self.server_momentum < 1, f"server-momentum must be in [0, 1), got {self.server_momentum}")
        need(0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1], got {self.fraction_train}")
        need(1 <= self.min_clients <= self.clients,
             f"min-clients must be between 1 and clients ({self.clients}), got {self.min_clients}")
        need(0 <= self.min_reply_fraction <= 1,
             f"min-reply-fraction must be in [0, 1] (0 = min-clients alone), got {self.min_reply_fraction}")
        need(self.max_failed_rounds >= 0,
             f"max-failed-rounds must be >= 0 rounds (0 = never stop), got {self.max_failed_rounds}")
        need(self.round_timeout > 0, f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        need(0 <= self.noise_rate <= 1, f"noise-rate must be in [0, 1], got {self.noise_rate}")
        need(self.noise_kind in NOISE_KINDS, f"noise-kind must be one of {', '.join(NOISE_KINDS)}, got {self.noise_kind!r}")
        self.client_noise_rates()  # raises naming the bad entry
        need(0 <= self.unsure_rate < 1, f"unsure-rate must be in [0, 1) (1 would never answer), got {self.unsure_rate}")
        need(0 <= self.verify_threshold <= 1,
             f"verify-threshold must be in [0, 1] (0 = no second readings), got {self.verify_threshold}")
        need(self.max_train >= 0, f"max-train must be >= 0 (0 = all), got {self.max_train}")
        need(self.n_classes == 0 or self.n_classes >= 2,
             f"n-classes must be 0 (from the labels) or >= 2, got {self.n_classes}")
        need(self.seed >= 0, f"seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")
        need(self.output_dir.strip() != "", "output-dir must not be empty (results, checkpoint and client "
             "databases go there); give a folder such as runs/latest")
        need(self.local_model_epochs >= 0, f"local-model-epochs must be >= 0 (0 = local-epochs), got {self.local_model_epochs}")
        need(self.offline_budget >= 0, f"offline-budget must be >= 0 labels per site (0 = no labels asked while the "
             f"server is away), got {self.offline_budget}")
        need(self.total_budget >= 0, f"total-budget must be >= 0 (0 = no cap), got {self.total_budget}")
        initial = self.clients * self.initial_labels
        need(self.total_budget == 0 or self.total_budget >= initial,
             f"total-budget {self.total_budget} is below the initial labels of all clients ({self.clients} clients x "
             f"initial-labels {self.initial_labels} = {initial}), which count toward it; give total-budget >= "
             f"{initial}, or fewer initial-labels")
        need(self.stop_min_delta >= 0, f"stop-min-delta must be >= 0, got {self.stop_min_delta}")
        need(self.stop_patience >= 1, f"stop-patience must be >= 1 query round, got {self.stop_patience}")
        need(0 < self.stop_uncertainty <= 1, f"stop-uncertainty must be in (0, 1], got {self.stop_uncertainty}")
        need(self.after_stop in ("continue", "end"), f"after-stop must be continue or end, got {self.after_stop!r}")
        try:
            self.stopping_criteria()
        except ConfigError as exc:
            raise ConfigError(f"stop-when / stop-* settings: {exc}") from None
        need(self.query_timeout >= 0, f"query-timeout must be >= 0 seconds (0 = requests never expire), got {self.query_timeout}")
        need(self.dp_clipping_norm >= 0, f"dp-clipping-norm must be >= 0 (0 = no differential privacy), got {self.dp_clipping_norm}")
        need(self.dp_noise_multiplier >= 0, f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}")
        need(self.dp_noise_multiplier == 0 or self.dp_clipping_norm > 0,
             f"dp-noise-multiplier {self.dp_noise_multiplier} needs dp-clipping-norm > 0 (the noise is scaled by the "
             "clipping norm); set e.g. --dp-clipping-norm 1.0")
        need(self.dp_mode in DP_MODES, f"dp-mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        need(0 < self.dp_delta < 1, f"dp-delta must be in (0, 1), e.g. 1e-5 (below 1 / clients), got {self.dp_delta}")
        need(self.head_clip_norm >= 0, f"head-clip-norm must be >= 0 (0 = no clipping), got {self.head_clip_norm}")
        need(self.head_dp_noise >= 0 and math.isfinite(self.head_dp_noise),
             f"head-dp-noise must be a finite number >= 0, got {self.head_dp_noise}")
        need(self.head_dp_epsilon >= 0 and math.isfinite(self.head_dp_epsilon), f"head-dp-epsilon must be a finite "
             f"number >= 0 (0 = not private; leave it 0 for no noise), got {self.head_dp_epsilon}")
        need(self.head_dp_noise == 0 or self.head_dp_epsilon == 0, f"give head-dp-epsilon ({self.head_dp_epsilon}) or "
             f"head-dp-noise ({self.head_dp_noise}), not both: the noise follows from the epsilon")
        need(self.head_dp_releases >= 1, f"head-dp-releases must be >= 1, got {self.head_dp_releases}")
        need(self.head_dp_release_growth > 1 and math.isfinite(self.head_dp_release_growth),
             f"head-dp-release-growth must be a finite number > 1 (e.g. 1.5: release when the labels have grown "
             f"half again), got {self.head_dp_release_growth}")
        need(not self.head_private or (self.head_clip_norm > 0 and self.pipeline == "head"),
             f"a private run (head-dp-epsilon / head-dp-noise) needs pipeline = head and head-clip-norm > 0 (the "
             f"noise is scaled by what one clipped sample can add), got pipeline = {self.pipeline!r}, head-clip-norm "
             f"= {self.head_clip_norm}; set e.g. --set head-clip-norm=8")
        need(self.min_class_count >= -1, f"min-class-count must be >= 0 (-1 = the default: 2 without secure "
             f"aggregation), got {self.min_class_count}")
        need(0 < self.secure_threshold <= 1, f"secure-threshold must be in (0, 1] (the share of a site's neighbours "
             f"whose shares rebuild its masks), got {self.secure_threshold}")
        need(self.secure_clip_norm > 0, f"secure-clip-norm must be > 0, got {self.secure_clip_norm}")
        need(1 <= self.secure_max_count < 2 ** 31, f"secure-max-count must be in [1, 2^31), got {self.secure_max_count}")
        self._validate_ray(need)
        if self.secure_aggregation:
            self._validate_secure(need)
        if self.pipeline == "handover":
            need(self.dp_clipping_norm == 0, "differential privacy is not available with pipeline = handover (the "
                 "update holds a network and statistics): set pipeline = network or head")
        if self.pipeline == "head":
            need(self.aggregation == "fedavg", f"aggregation {self.aggregation!r} averages networks; the head pipeline "
                 "sums the clients' statistics instead: leave aggregation = fedavg, or set pipeline = network")
            need(self.dp_clipping_norm == 0, "differential privacy clips and noises network updates: set "
                 "pipeline = network to use dp-clipping-norm (the head pipeline sends statistics)")
        return self

    def _validate_ray(self, need) -> None:
        address = self.ray_address.strip()
        named = address in ("", "local", "auto")
        need(named or (RAY_ADDRESS.fullmatch(address) is not None and 1 <= int(address.rsplit(":", 1)[1]) <= 65535),
             f"ray-address must be "
             f"\"\" ($RAY_ADDRESS, else a Ray of this machine), \"local\", \"auto\" (the cluster `ray start` started "
             f"here) or the head node's HOST:PORT (e.g. 10.0.0.5:6379, ray://HOST:PORT for Ray Client), got "
             f"{self.ray_address!r}")
        need(self.actor_cpus > 0 and math.isfinite(self.actor_cpus),
             f"actor-cpus must be a number of CPUs > 0 (e.g. 1, or 0.5 for two actors per core), got {self.actor_cpus}")
        need(0 <= self.actor_gpus and math.isfinite(self.actor_gpus) and (self.actor_gpus <= 1
                                                                          or self.actor_gpus.is_integer()),
             f"actor-gpus must be 0 (no GPU), a share of one GPU in (0, 1] or a whole number of GPUs (Ray gives "
             f"fractions of one GPU only), got {self.actor_gpus}")
        need(0 <= self.actor_memory_gib and math.isfinite(self.actor_memory_gib),
             f"actor-memory-gib must be >= 0 GiB (0 = no reservation), got {self.actor_memory_gib}")

    def _validate_secure(self, need) -> None:
        from fedal.secure import MAX_SITES

        need(self.min_clients >= 2 and self.clients >= 2, "secure aggregation needs at least 2 sites in every round "
             f"(a sum of one site is that site's update): set min-clients >= 2, got clients={self.clients}, "
             f"min-clients={self.min_clients}")
        need(self.clients <= MAX_SITES, f"secure aggregation sums at most {MAX_SITES} sites per round (Flower's 32-bit "
             f"modulus), got clients={self.clients}")
        need(self.aggregation in ("fedavg", "fedprox", "fedadam", "fedavgm"), f"aggregation {self.aggregation!r} "
             "needs every site's update, which secure aggregation hides from the server: use fedavg, fedprox, "
             "fedadam or fedavgm, or secure-aggregation = false")
        need(self.dp_clipping_norm == 0 or self.dp_mode == "client", "under secure aggregation the server never "
             "sees a site's update, so it cannot clip it or noise it: set dp-mode = \"client\" (each site clips its "
             "update and adds its share of the noise before masking), or secure-aggregation = false")

    @property
    def distributed_dp(self) -> bool:
        """Whether the sites add differential privacy noise to the network updates they send under secure
        aggregation (:class:`fedal.dp.UpdateNoise`): the server unmasks a sum that is already noisy."""
        return self.secure_aggregation and self.dp_clipping_norm > 0 and self.dp_noise_multiplier > 0

    @property
    def sites_add_noise(self) -> bool:
        """Whether the sites add differential privacy noise to what they send (head statistics or network updates):
        their reports then leave out the scalars computed from their labels (:func:`clients.site.private_report`)."""
        return self.head_private or self.distributed_dp

    @property
    def head_private(self) -> bool:
        """Whether the sites add differential privacy noise to the statistics they send (:mod:`fedal.dp`)."""
        return self.head_dp_noise > 0 or self.head_dp_epsilon > 0

    @property
    def self_training(self) -> float:
        """The pseudo-label threshold the head uses: 0 in a private run (the self-trained statistics of the pool
        would be released again every round, outside the noise's guarantee)."""
        return 0.0 if self.head_private else self.pseudo_label_threshold

    @property
    def clear_min_count(self) -> int:
        """The fewest labels of a class whose statistics a site sends (and renews) in the clear (1 = any)."""
        if self.head_private:  # the noise, not a minimum count, protects a small class
            return 1
        if self.min_class_count >= 0:
            return max(self.min_class_count, 1)
        return 1 if self.secure_aggregation or self.pipeline == "network" else 2

    def site_path(self, client_id: int) -> str:
        """Where client ``client_id`` of a simulation reads its data (``site-data``), "" = its share of the data set."""
        return self.site_data.replace("{id}", str(int(client_id))) if self.site_data else ""

    def round_lr_factor(self, server_round: int) -> float:
        """The factor ``lr-schedule`` gives round ``server_round``'s learning rate (1 with ``constant``):
        a linear warm-up over the first :data:`WARMUP_SHARE` of the rounds, then a cosine decay to 0."""
        if self.lr_schedule == "constant":
            return 1.0
        warm = max(1, round(WARMUP_SHARE * self.rounds))
        if server_round <= warm:
            return server_round / warm
        t = (server_round - warm) / max(self.rounds - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def is_eval_round(self, server_round: int) -> bool:
        """Whether ``server_round`` evaluates and records a row: round 1, the round before each query round
        (the model that scores the pools), each query round when a stopping criterion reads its row
        (``stop-when``), the last round, and every ``eval-every``-th round, unless the next round is one of
        the others (one round more of training changes little: no test pass is paid twice in a row for it)."""
        if self.eval_every == 1 or self._must_evaluate(server_round):
            return True
        return server_round % self.eval_every == 0 and not self._must_evaluate(server_round + 1)

    def _must_evaluate(self, server_round: int) -> bool:
        return (server_round in (1, self.rounds) or self.is_query_round(server_round + 1)
                or (bool(self.stop_when.strip()) and self.is_query_round(server_round)))

    def query_strategy(self):
        """The run's query strategy, built with its options (ConfigError naming a bad name or option)."""
        return _build_strategy(self.strategy, self.strategy_options, "strategy")

    def cold_start_strategy(self):
        """The strategy that picks each client's initial labeled set, built with its options."""
        return _build_strategy(self.initial_strategy, self.initial_strategy_options, "initial-strategy")

    def verify_note(self) -> str | None:
        """Why ``verify-threshold`` will make almost no second readings with this run's strategy, or None."""
        if self.verify_threshold <= 0 or not getattr(self.query_strategy(), "picks_uncertain", False):
            return None
        return (f"verify-threshold {self.verify_threshold}: strategy {self.strategy} picks the samples the model "
                f"is least sure of, so it is hardly ever {self.verify_threshold:.0%} confident about one and almost "
                "no second reading will be made; use random or a diversity strategy (badge, coreset) to catch "
                "wrong answers with second readings")

    def stopping_criteria(self):
        """The run's stopping criteria (:func:`fedal.stopping.criteria_from`)."""
        from fedal.stopping import criteria_from

        return criteria_from(self.stop_when, patience=self.stop_patience, min_delta=self.stop_min_delta,
                             uncertainty=self.stop_uncertainty, total_budget=self.total_budget)

    def client_noise_rates(self) -> list[float]:
        """The simulated oracle's noise rate of each client: ``client-noise`` when given, else ``noise-rate``."""
        if not self.client_noise.strip():
            return [self.noise_rate] * self.clients
        rates = []
        for entry in self.client_noise.split(","):
            try:
                rate = float(entry)
            except ValueError:
                raise ConfigError(f"client-noise must be comma-separated rates in [0, 1], one per client, got "
                                  f"{entry.strip()!r} in {self.client_noise!r}") from None
            if not 0 <= rate <= 1:
                raise ConfigError(f"client-noise rates must be in [0, 1], got {rate:g} in {self.client_noise!r}")
            rates.append(rate)
        if len(rates) != self.clients:
            raise ConfigError(f"client-noise gives {len(rates)} rates for {self.clients} clients: give one per client "
                              f"(e.g. \"{','.join(['0'] * self.clients)}\") or leave it empty to use noise-rate")
        return rates

    def is_query_round(self, server_round: int) -> bool:
        """Whether ``server_round`` queries: round 1 labels the initial sets; then every
        ``query_every``-th round queries."""
        return server_round >= 2 and (server_round - 2) % self.query_every == 0

    @property
    def client_state_dir(self) -> Path:
        """Folder of the clients' SQLite databases in a simulation."""
        return Path(self.state_dir) if self.state_dir else Path(self.output_dir) / "clients"

    # ----------------------------------------------------------- conversions
    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the settings (snake_case)."""
        return [f.name for f in fields(cls)]

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case dict, the shape of a Flower run config."""
        return {name.replace("_", "-"): getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, base: "FederationConfig | None" = None) -> "FederationConfig":
        """Build from ``values``, a (kebab- or snake-case) mapping, over ``base`` (default: the
        defaults), converting and checking types.

        Unknown keys raise :class:`ConfigError` listing the known ones.
        """
        types = {f.name: f.type for f in fields(cls)}
        current = dataclasses.asdict(base) if base else {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in types:
                raise ConfigError(
                    f"unknown setting {key!r}; known settings: {', '.join(n.replace('_', '-') for n in types)}"
                )
            if name.endswith("strategy_options") and isinstance(value, dict):  # a TOML table
                value = format_options(parse_options(value, name))
            current[name] = _convert(name, value, types[name])
        return cls(**current)

    def replace(self, **changes: Any) -> "FederationConfig":
        """A copy with ``changes`` (snake- or kebab-case names) applied, converted and validated."""
        return type(self).from_mapping(changes, base=self)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "FederationConfig":
        """Build from ``run_config`` (a Flower run config), ignoring keys that are not fedal settings."""
        known = set(cls.field_names())
        return cls.from_mapping({k: v for k, v in run_config.items() if k.replace("-", "_") in known})

    @classmethod
    def from_toml(cls, path: str | Path, *, base: "FederationConfig | None" = None) -> "FederationConfig":
        """Load settings from the TOML file at ``path`` (flat keys, or under ``[fedal]``) over ``base``."""
        data = read_toml(path, what="config file")
        return cls.from_mapping(data.get("fedal", data), base=base)


def _convert(name: str, value: Any, typ: Any) -> Any:
    kebab = name.replace("_", "-")
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        article = "an" if typ[:1] in "aeiou" else "a"
        raise ConfigError(f"setting {kebab} must be {article} {typ}, got {value!r}") from None


#: settings that say where a simulation runs, not what it computes: a run may change them when it resumes, and a
#: comparison's finished run is reused whatever they were
PLACEMENT_SETTINGS = ("ray-address", "actor-cpus", "actor-gpus", "actor-memory-gib")
#: settings that name a file or folder (``dataset`` too, when it names an ``.npz`` file)
PATH_SETTINGS = ("data-dir", "output-dir", "state-dir")


def absolute_paths(values: dict[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """``values`` (settings, kebab- or snake-case) with every relative path made absolute against ``base`` (default:
    the current directory, where the user typed them).

    A run config sent to a deployment is read by a ServerApp and ClientApps in other working directories (those of
    the SuperLink and the SuperNodes), where a relative path would name another folder; a helper that submits a run
    resolves its paths with this first. ``dataset`` is a path when it names an ``.npz`` file that exists under
    ``base`` (else it is looked up in ``data-dir``, as :func:`fedal.data.load_dataset` does); "" stays "" (the
    default)."""
    root = Path.cwd() if base is None else Path(base)
    out = dict(values)
    for key, value in values.items():
        kebab = str(key).replace("_", "-")
        if not isinstance(value, str) or not value.strip():
            continue
        path = Path(value.strip()).expanduser()
        if kebab in PATH_SETTINGS or (kebab == "dataset" and path.suffix.lower() == ".npz" and (root / path).is_file()):
            out[key] = str(path if path.is_absolute() else (root / path).resolve())
    return out


def parse_assignments(items, flag: str = "--set") -> dict[str, str]:
    """``items``, ``["KEY=VALUE", ...]`` (repeatable ``--set`` flags), as a dict of strings (the setting
    converts them); ``flag`` names the flag in the message.

    Raises
    ------
    ConfigError
        Naming an item without ``=`` or without a key.
    """
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} needs KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------- strategy names and options
def canonical_name(name: str) -> str:
    """A strategy name as the registry spells it: ``"Entropy"`` -> ``"entropy"``, ``"kafal-diverse"`` ->
    ``"kafal_diverse"``."""
    return str(name).strip().lower().replace("-", "_")


def model_free_strategies() -> list[str]:
    """Registered strategies that need no model: the ones that can pick an initial labeled set."""
    from fedal.strategies import available_strategies, get_strategy

    return [n for n in available_strategies() if not get_strategy(n).needs_model]


def parse_options(options: str | dict, setting: str = "strategy_options") -> dict[str, Any]:
    """Strategy options from ``"key=value,key=value"`` (values read as TOML scalars, else as text) or a mapping.

    Parameters
    ----------
    options : str or dict
        What the user gave.
    setting : str
        The setting's name, for the messages.
    """
    kebab = setting.replace("_", "-")
    if isinstance(options, dict):
        items = list(options.items())
    else:
        items = []
        for part in (p.strip() for p in str(options).split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{kebab} takes key=value pairs separated by commas (e.g. n_samples=20), got {part!r}")
            items.append((key, _scalar(value.strip())))
    out = {}
    for key, value in items:
        name = str(key).strip().replace("-", "_")
        if not name.isidentifier():
            raise ConfigError(f"{kebab}: {key!r} is not an option name")
        if isinstance(value, (dict, list)) or (isinstance(value, str) and ("," in value or "=" in value)):
            raise ConfigError(f"{kebab}: option {name} must be a number, true/false or a word, got {value!r}")
        out[name] = value
    return out


def format_options(options: dict[str, Any]) -> str:
    """The one spelling of strategy options: sorted ``key=value`` pairs (what a run records)."""
    return ",".join(f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in sorted(options.items()))


def _scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build_strategy(name: str, options: str, setting: str):
    import inspect

    from fedal.strategies import available_strategies, get_strategy

    try:
        get_strategy(name)
    except UnknownStrategyError:
        raise ConfigError(f"unknown {setting} {name!r}; choose one of {', '.join(available_strategies())}") from None
    except ConfigError:
        pass  # a strategy whose defaults need options: checked with them below
    kwargs = parse_options(options, f"{setting}-options")
    from fedal.strategies.registry import strategy_class

    params = inspect.signature(strategy_class(name).__init__).parameters.values()
    known = [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"{setting}-options: {name} has no option {', '.join(unknown)}; "
                          f"its options are {', '.join(known) or 'none'}")
    try:
        return get_strategy(name, **kwargs)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{setting}-options: {exc}") from None
