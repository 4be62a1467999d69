"""The head and the network together, one of them serving: the ``handover`` pipeline's model.

A federation starts with few labels, where the closed-form head on fixed features is far
ahead of any network, and gathers more, where the network keeps learning after the head
has stopped. :class:`HandoverClassifier` holds both: a :class:`HeadClassifier` on the
features of an input and a :class:`TorchClassifier` on the input itself. Whichever
``serving`` names answers every question a strategy, a learner or the labeling page asks
(probabilities, embeddings, evaluation); both are trained every round. The server decides
when the network takes over (:mod:`server.handover`), from the sites' aggregated accuracy
of both on their local test sets, and the flag travels with the model.

Inputs are rows ``[features | input flattened]`` (:func:`fedal.features.model_inputs` with a
:class:`~fedal.features.WithInputs` featurizer): the first ``dim`` columns go to the head, the
rest, in the input's shape, to the network. The state names the head's arrays
``head/<name>``, the network's ``net/<name>`` and the flag :data:`SERVING` (0 = the head, 1 =
the network).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from fedal.exceptions import ConfigError
from fedal.models.head_adapter import HeadClassifier

if TYPE_CHECKING:  # imported where a network is built (fedal.models.build_model): a head alone needs no torch
    from fedal.models.torch_adapter import TorchClassifier

#: prefixes of the two models' arrays in the state, and the name of the serving flag
HEAD_PREFIX, NET_PREFIX, SERVING = "head/", "net/", "serving"
#: what the flag's values mean
SERVES = ("head", "network")


def prefixed(arrays: dict, prefix: str) -> "OrderedDict[str, Any]":
    """``arrays`` with ``prefix`` before every name."""
    return OrderedDict((prefix + k, v) for k, v in arrays.items())


def unprefixed(arrays: dict, prefix: str) -> "OrderedDict[str, Any]":
    """The entries of ``arrays`` whose names start with ``prefix``, without it."""
    return OrderedDict((k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix))


class HandoverClassifier:
    """A head and a network on the same samples, one of them serving (see the module docstring).

    Parameters
    ----------
    head : HeadClassifier
        The head, on the first ``head.dim`` columns of an input row.
    net : TorchClassifier
        The network, on the remaining columns in the shape ``input_shape``.
    input_shape : tuple of int
        Shape of one input of the network (an image (C, H, W), or a table row).
    """

    #: the learner gives :meth:`fit` the unlabeled pool (the head's self-training)
    uses_unlabeled = True
    #: expected error reduction's closed-form update reads feature rows, which these rows are not
    closed_form = False
    #: a query strategy may read :attr:`serving` and :meth:`features` (``budget_aware``: typical samples of the
    #: head's features while the head serves)
    hands_over = True

    def __init__(self, head: HeadClassifier, net: TorchClassifier, input_shape: tuple[int, ...]) -> None:
        if head.n_classes != net.n_classes:
            raise ConfigError(f"the head has {head.n_classes} classes and the network {net.n_classes}; give both the "
                              "data set's classes")
        self.head, self.net = head, net
        self.n_classes = head.n_classes
        self.input_shape = tuple(int(s) for s in input_shape)
        self.serving = SERVES[0]

    # ------------------------------------------------------------- inputs
    @property
    def width(self) -> int:
        """Columns of an input row: the head's features, then the network's input flattened."""
        return self.head.dim + int(np.prod(self.input_shape))

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.width:
            raise ConfigError(f"the handover model takes rows of {self.head.dim} features and an input of shape "
                              f"{self.input_shape} ({self.width} values), got an array of shape {X.shape}; "
                              "make them with fedal.features.model_inputs and the run's featurizer")
        return X

    def features(self, X) -> np.ndarray:
        """The head's part of the rows ``X``."""
        return self._check(X)[:, : self.head.dim]

    def inputs(self, X) -> np.ndarray:
        """The network's part of the rows ``X``, in its input shape."""
        X = self._check(X)
        return np.ascontiguousarray(X[:, self.head.dim:]).reshape(len(X), *self.input_shape)

    @property
    def serving_model(self) -> HeadClassifier | TorchClassifier:
        """The model that answers: the head or the network."""
        return self.net if self.serving == "network" else self.head

    def _own(self, X) -> np.ndarray:
        return self.inputs(X) if self.serving == "network" else self.features(X)

    # ------------------------------------------------------------- what strategies read
    def forward(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings of the serving model for the rows ``X``."""
        return self.serving_model.forward(self._own(X))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of the serving model for the rows ``X``, shape (n, C)."""
        return self.forward(X)[0]

    def predict(self, X) -> np.ndarray:
        """Most probable class of the serving model per row of ``X``."""
        return self.predict_proba(X).argmax(axis=1)

    def evaluate(self, X, y) -> tuple[float, float]:
        """``(loss, accuracy)`` of the serving model on the rows ``X`` with labels ``y``."""
        return self.serving_model.evaluate(self._own(X), y)

    def evaluate_each(self, X, y) -> dict[str, tuple[float, float]]:
        """``{"head": (loss, accuracy), "network": (loss, accuracy)}`` on the rows ``X`` with labels ``y``."""
        return {"head": self.head.evaluate(self.features(X), y), "network": self.net.evaluate(self.inputs(X), y)}

    def sample_probs(self, X, n_samples: int, seed: int | None = None) -> np.ndarray:
        """``n_samples`` posterior (head) or MC-dropout (network) draws of the serving model's probabilities of
        the rows ``X``, drawn from ``seed``."""
        return self.serving_model.sample_probs(self._own(X), n_samples, seed=seed)

    # ------------------------------------------------------------- training
    def statistics(self, X, y, unlabeled=None, *, min_count: int = 1):
        """The head's class statistics of the rows ``X`` with labels ``y`` (and self-training on the rows
        ``unlabeled``, of the classes with at least ``min_count`` such rows): :meth:`HeadClassifier.statistics`."""
        return self.head.statistics(self.features(X) if len(X) else np.zeros((0, self.head.dim)), y,
                                    None if unlabeled is None else self.features(unlabeled), min_count=min_count)

    def fit(self, X, y, *, unlabeled=None, **kwargs) -> float:
        """Train both on the rows ``X`` with labels ``y`` (the head self-trains on ``unlabeled``); return the
        network's loss. Keyword arguments go to the network's fit."""
        if len(y) == 0:
            return float("nan")
        self.head.fit(self.features(X), y, unlabeled=None if unlabeled is None else self.features(unlabeled))
        return self.net.fit(self.inputs(X), y, **kwargs)

    def reset(self, seed: int | None = None) -> None:
        """Re-initialise both (from ``seed``, default their own); the head serves again."""
        self.head.reset(seed)
        self.net.reset(seed)
        self.serving = SERVES[0]

    # ------------------------------------------------------------- state
    def get_state(self) -> "OrderedDict[str, np.ndarray]":
        """Both models' arrays (``head/``, ``net/``) and the serving flag."""
        state = prefixed(self.head.get_state(), HEAD_PREFIX)
        state.update(prefixed(self.net.get_state(), NET_PREFIX))
        state[SERVING] = serving_flag(self.serving)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Load both models and the flag from ``state`` (as :meth:`get_state` gives)."""
        if SERVING not in state:
            raise ConfigError(f"a handover model's state has a {SERVING!r} flag; these arrays have none: "
                              f"{sorted(state)[:4]} ...")
        self.serving = serving_of(state)
        self.head.set_state(unprefixed(state, HEAD_PREFIX))
        self.net.set_state(unprefixed(state, NET_PREFIX))

    def buffer_keys(self) -> list[str]:
        """State names a federation averages instead of stepping on: the network's buffers and the flag."""
        return [NET_PREFIX + k for k in self.net.buffer_keys()] + [SERVING]

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays a site sends back: the head's statistics, the network, the flag."""
        shapes = prefixed(HeadClassifier.statistics_shapes(self.n_classes, self.head.dim), HEAD_PREFIX)
        shapes.update((NET_PREFIX + k, tuple(v.shape)) for k, v in self.net.get_state().items())
        shapes[SERVING] = (1,)
        return dict(shapes)


def serving_flag(serving: str) -> np.ndarray:
    """The state's :data:`SERVING` array for ``serving`` (``"head"`` or ``"network"``)."""
    return np.array([SERVES.index(serving)], dtype=np.int64)


def serving_of(state: dict) -> str:
    """Which model the state ``state`` says serves (``"head"`` or ``"network"``)."""
    flag = int(np.asarray(state[SERVING]).reshape(-1)[0])
    if flag not in (0, 1):
        raise ConfigError(f"the serving flag is 0 (the head) or 1 (the network), got {flag}")
    return SERVES[flag]
