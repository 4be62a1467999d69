"""Models and the adapters that let strategies and learners use them.

The torch and scikit-learn adapters are imported when first used (:func:`__getattr__`): a site's
process that only sums a head's statistics (each Flower message starts one in deployment) then
imports neither torch nor scikit-learn.
"""
from __future__ import annotations

import importlib

import numpy as np

from fedal.exceptions import ConfigError
from fedal.models.handover_adapter import HandoverClassifier
from fedal.models.head_adapter import HeadClassifier

#: the adapters imported on first use: name -> its module
_LAZY = {"MLP": "fedal.models.nets", "ConvNet": "fedal.models.nets", "SmallCNN": "fedal.models.nets",
         "SklearnClassifier": "fedal.models.sklearn_adapter", "TorchClassifier": "fedal.models.torch_adapter"}


def __getattr__(name: str):
    """The torch / scikit-learn adapters of :data:`_LAZY`, imported the first time they are asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConvNet", "HandoverClassifier", "HeadClassifier", "MLP", "SmallCNN", "SklearnClassifier", "TorchClassifier", "build_model", "model_for"]


#: image data sets whose classes do not change under a horizontal flip (cells, tissue, skin)
FLIP_INVARIANT = ("bloodmnist", "pathmnist", "dermamnist")


def build_model(input_shape: tuple[int, ...], n_classes: int, *, network: str = "smallcnn", norm: str = "group",
                **kwargs) -> TorchClassifier:
    """The torch model for an input shape: ``network`` (a SmallCNN or a ConvNet) for square (C, S, S) images of
    S >= 28 pixels (28, 64, 128, 224: the networks scale their first stride or their pooling), else an MLP.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one input (``Dataset.input_shape``).
    n_classes : int
        Number of classes.
    network : {"smallcnn", "convnet"}
        The network for images.
    norm : str
        ConvNet's normalisation (:data:`fedal.models.nets.NORMS`).
    **kwargs
        Go to :class:`TorchClassifier` (epochs, lr, batch_size, seed, ...).
    """
    from fedal.models.nets import MLP, ConvNet, SmallCNN
    from fedal.models.torch_adapter import TorchClassifier

    if len(input_shape) == 3 and input_shape[0] in (1, 3) and input_shape[1] == input_shape[2] >= 28:
        channels, side = input_shape[0], int(input_shape[1])
        if network == "convnet":
            return TorchClassifier(lambda: ConvNet(channels, n_classes, norm=norm, input_size=side), n_classes, **kwargs)
        return TorchClassifier(lambda: SmallCNN(channels, n_classes), n_classes, **kwargs)
    kwargs["augment"] = "none"
    n_features = 1
    for s in input_shape:
        n_features *= int(s)
    return TorchClassifier(lambda: MLP(n_features, n_classes), n_classes, **kwargs)


def model_for(cfg, input_shape: tuple[int, ...], n_classes: int, *, seed: int,
              raw_shape: tuple[int, ...] | None = None) -> TorchClassifier | HeadClassifier | HandoverClassifier:
    """The model a run trains: a :class:`HeadClassifier` (``pipeline = "head"``), :func:`build_model`
    with the run's training settings (``pipeline = "network"``), or both in a :class:`HandoverClassifier`
    (``pipeline = "handover"``).

    The one factory of a federation's models: every client's, the server's reference and
    the centralized learner ``fedal compare`` measures against.

    Parameters
    ----------
    cfg : fedal.config.FederationConfig
        ``pipeline``; ``head_shrinkage``, ``pseudo_label_threshold`` (head) or ``local_epochs``,
        ``batch_size``, ``lr``, ``min_local_steps``, ``network``, ``norm``, ``augment``, ``local_steps``,
        ``momentum``, ``weight_decay`` (network).
    input_shape : tuple of int
        Shape of one model input: the feature vector when a featurizer applies (:mod:`fedal.features`).
    n_classes : int
        Number of classes.
    seed : int
        Seed of the initial weights and of every fit (see :mod:`fedal.seeds`).
    raw_shape : tuple of int, optional
        Shape of one input as the data set has it; ``pipeline = "handover"`` needs it (its rows are
        the features, then the input flattened: :class:`fedal.features.WithInputs`).
    """
    if cfg.pipeline == "handover":
        if raw_shape is None:
            raise ConfigError("pipeline = handover needs the inputs' own shape (raw_shape) to build its network")
        dim = int(input_shape[0]) - int(np.prod(raw_shape))
        if len(input_shape) != 1 or dim < 1:
            raise ConfigError(f"handover rows of shape {tuple(input_shape)} cannot hold features and inputs of shape "
                              f"{tuple(raw_shape)}; make them with fedal.features.model_inputs")
        return HandoverClassifier(_head(cfg, dim, n_classes, seed, raw_shape),
                                  _network(cfg, tuple(raw_shape), n_classes, seed), tuple(raw_shape))
    if cfg.pipeline == "head":
        return _head(cfg, int(np.prod(input_shape)), n_classes, seed, raw_shape)
    return _network(cfg, input_shape, n_classes, seed)


def _head(cfg, dim: int, n_classes: int, seed: int, raw_shape) -> HeadClassifier:
    return HeadClassifier(n_classes, dim, shrinkage=None if cfg.head_shrinkage < 0 else cfg.head_shrinkage,
                          pseudo_label_threshold=cfg.self_training, seed=seed,
                          clip_norm=statistics_clip_norm(cfg, raw_shape))


def statistics_clip_norm(cfg, raw_shape: tuple[int, ...] | None) -> float:
    """The L2 norm the head's feature vectors are clipped to: ``head-clip-norm``; with secure aggregation and no
    such setting, the largest norm image descriptors can have (:meth:`fedal.features.ImageDescriptors.max_norm`,
    which clips nothing of images in [0, 1]: the fixed-point range needs a bound); 0 (none) otherwise.

    Parameters
    ----------
    cfg : FederationConfig
        The run's settings (``head-clip-norm``, ``secure-aggregation``, ``features``).
    raw_shape : tuple of int or None
        The shape of one input as the data set has it (which features the head reads).
    """
    if cfg.head_clip_norm > 0 or not cfg.secure_aggregation:
        return float(cfg.head_clip_norm)
    from fedal.features import featurizer_for

    featurizer = None if raw_shape is None else featurizer_for(cfg.features, tuple(raw_shape), "head")
    bound = getattr(featurizer, "max_norm", None)
    if bound is None:
        size = int(np.prod(raw_shape)) if raw_shape is not None else 0
        hint = f"; rows of {size} values in [0, 1] have norms up to {np.sqrt(size):.3g}" if size else ""
        raise ConfigError("secure aggregation of the head's statistics needs a bound on the feature vectors' L2 norm, "
                          "and these features have none: set head-clip-norm (each site clips its rows to it; e.g. "
                          f"the largest row norm of the data{hint})")
    return float(bound(tuple(raw_shape)))


def feature_bound(model) -> float:
    """The clip norm of the head of ``model`` (head or hand-over pipeline), 0 for a network alone."""
    head = model.head if isinstance(model, HandoverClassifier) else model
    return float(head.clip_norm) if isinstance(head, HeadClassifier) else 0.0


def _network(cfg, input_shape: tuple[int, ...], n_classes: int, seed: int) -> TorchClassifier:
    return build_model(input_shape, n_classes, network=cfg.network, norm=cfg.norm, epochs=cfg.local_epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, min_steps=cfg.min_local_steps, seed=seed,
                       optimizer=cfg.local_optimizer, restricted_softmax=cfg.restricted_softmax,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, local_steps=cfg.local_steps,
                       augment=augmentation_for(cfg.augment, cfg.dataset, input_shape),
                       consistency=cfg.consistency, consistency_threshold=cfg.consistency_threshold)


def augmentation_for(augment: str, dataset: str, input_shape: tuple[int, ...]) -> str:
    """What ``augment`` (a setting) means for the data set ``dataset`` (a name or a file path) whose inputs have
    ``input_shape``: with ``auto``, shifts for images, and flips too for the :data:`FLIP_INVARIANT` data sets;
    nothing for inputs that are not images. Other values are kept."""
    if augment != "auto":
        return augment
    if len(input_shape) != 3:
        return "none"
    from pathlib import Path

    return "shift-flip" if Path(str(dataset)).stem.lower() in FLIP_INVARIANT else "shift"


def secure_codec(cfg, model, noise_rng=None, centre=None):
    """The fixed-point encoding of secure aggregation for ``model`` (:class:`fedal.secure.FixedPoint`): the same on
    every site and on the server, from the run's settings ``cfg`` (``secure-max-count``, ``secure-clip-norm``) and
    the head's clip norm; in a private run on the noise's grid (the labels' scaled to ``centre``'s clip), and on a site
    with ``noise_rng`` adding its share. With network differential privacy (``dp-clipping-norm``) every site's change
    is clipped to that norm and weighs 1, and with ``dp-noise-multiplier`` carries the site's share of the noise."""
    from fedal.dp import network_noise, run_noise
    from fedal.secure import FixedPoint

    noise = run_noise(cfg, model.n_classes, model.dim).centred(centre) if cfg.head_private else None
    private_updates = cfg.secure_aggregation and cfg.dp_clipping_norm > 0  # clipped to dp-clipping-norm, weight 1
    return FixedPoint(max_count=cfg.secure_max_count, feature_bound=feature_bound(model),
                      clip_norm=cfg.dp_clipping_norm if private_updates else cfg.secure_clip_norm,
                      noise=noise, noise_rng=noise_rng, update_noise=network_noise(cfg), equal_weights=private_updates)
