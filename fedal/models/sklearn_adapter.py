"""A scikit-learn classifier with ``predict_proba`` behind the strategy interface."""
from __future__ import annotations

import numpy as np
from sklearn.base import clone

from fedal.exceptions import ConfigError


class SklearnClassifier:
    """Wrap any scikit-learn classifier that has ``predict_proba``.

    Probabilities always have ``n_classes`` columns, even when the labeled set has not
    yet seen every class. Embeddings are the input features (after every step but the
    last when the estimator is a ``Pipeline``). Committee samples come from the fitted
    ensemble's members (``estimators_``, e.g. random forests) or, for single models,
    from a bootstrap committee trained on the last ``fit`` data (Abe & Mamitsuka 1998).

    Parameters
    ----------
    estimator : sklearn classifier
        Unfitted estimator with ``predict_proba``; cloned on every fit.
    n_classes : int
        Number of classes; labels are integers ``0 .. n_classes - 1``.
    seed : int
        Seed for bootstrap committees.
    """

    def __init__(self, estimator, n_classes: int, seed: int = 0) -> None:
        if not hasattr(estimator, "predict_proba"):
            raise ConfigError(
                f"{type(estimator).__name__} has no predict_proba; use a probabilistic classifier "
                "(e.g. LogisticRegression, RandomForestClassifier, SVC(probability=True))."
            )
        if n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
        self.estimator = estimator
        self.n_classes = int(n_classes)
        self.seed = int(seed)
        self.fitted_ = None
        self._train: tuple[np.ndarray, np.ndarray] | None = None
        self._committee: dict[tuple[int, int | None], list] = {}

    @staticmethod
    def _flat(X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X.reshape(len(X), int(np.prod(X.shape[1:])))  # not -1: that fails on zero rows

    def fit(self, X, y, **_: object) -> float:
        """Fit a fresh clone on ``(X, y)``; return the training log-loss."""
        X, y = self._flat(X), np.asarray(y, dtype=np.int64).reshape(-1)
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise ConfigError(f"labels must lie in [0, {self.n_classes - 1}], got range [{y.min()}, {y.max()}]")
        self._train = (X, y)
        self._committee.clear()
        self.fitted_ = self._fit_one(X, y)
        if len(y) == 0:
            return float("nan")
        p = self.predict_proba(X)[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    def _fit_one(self, X: np.ndarray, y: np.ndarray, estimator=None):
        classes = np.unique(y)
        if len(classes) < 2:  # most estimators refuse one class: predict it (or the prior) outright
            return ("constant", classes)
        return clone(estimator if estimator is not None else self.estimator).fit(X, y)

    def _proba(self, model, X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), self.n_classes))
        if model is None or (isinstance(model, tuple) and len(model[1]) == 0):
            out[:] = 1.0 / self.n_classes
        elif isinstance(model, tuple):
            out[:, model[1][0]] = 1.0
        else:
            out[:, model.classes_.astype(np.int64)] = model.predict_proba(X)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of inputs ``X``, shape (n, n_classes)."""
        return self._proba(self.fitted_, self._flat(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class per sample of ``X``."""
        return self.predict_proba(X).argmax(axis=1)

    def evaluate(self, X, y) -> tuple[float, float]:
        """``(log-loss, accuracy)`` on inputs ``X`` with labels ``y``."""
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        probs = self.predict_proba(X)
        loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
        return loss, float((probs.argmax(axis=1) == y).mean())

    def embed(self, X) -> np.ndarray:
        """Features the final estimator sees for ``X`` (the pipeline's transform, or the input)."""
        X = self._flat(X)
        model = self.fitted_
        if hasattr(model, "steps"):
            for _, step in model.steps[:-1]:
                X = step.transform(X)
        return np.asarray(X, dtype=np.float32)

    def forward(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings of inputs ``X``."""
        return self.predict_proba(X).astype(np.float32), self.embed(X)

    def sample_probs(self, X, n_samples: int, seed: int | None = None) -> np.ndarray:
        """Committee probabilities ``(n_samples, n, C)`` for inputs ``X``: ensemble members or a
        bootstrap committee, chosen with ``seed`` (default the adapter's seed)."""
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        X = self._flat(X)
        members = getattr(self.fitted_, "estimators_", None)
        # gradient boosting's estimators_ is an array of regressors: use a bootstrap committee then
        usable = (members is not None and len(members) >= 1 and not hasattr(self.fitted_, "steps")
                  and all(hasattr(m, "predict_proba") and hasattr(m, "classes_") for m in members))
        if usable:
            rng = np.random.default_rng(self.seed if seed is None else seed)
            chosen = rng.choice(len(members), size=n_samples, replace=len(members) < n_samples)
            classes = self.fitted_.classes_.astype(np.int64)
            out = []
            for i in chosen:
                # forest and bagging members are fitted on class indices 0..k-1 of classes_ (a
                # bagging member may have seen only some); others (AdaBoost) on the labels
                own = members[i].classes_
                cols = classes if np.array_equal(own, classes) else classes[own.astype(np.int64)]
                p = np.zeros((len(X), self.n_classes))
                p[:, cols] = members[i].predict_proba(X)
                out.append(p)
            return np.stack(out).astype(np.float32)
        key = (n_samples, seed)
        if key not in self._committee:
            self._committee[key] = self._bootstrap(n_samples, seed)
        return np.stack([self._proba(m, X) for m in self._committee[key]]).astype(np.float32)

    def _bootstrap(self, n_samples: int, seed: int | None) -> list:
        if self._train is None:
            return [None] * n_samples
        Xtr, ytr = self._train
        rng = np.random.default_rng(self.seed if seed is None else seed)
        committee = []
        for _ in range(n_samples):
            idx = rng.integers(0, len(ytr), size=len(ytr)) if len(ytr) else np.zeros(0, dtype=int)
            committee.append(self._fit_one(Xtr[idx], ytr[idx]))
        return committee
