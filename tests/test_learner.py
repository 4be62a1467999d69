"""The on-device active learner: query -> teach -> fit -> evaluate, stops, cold start, resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fedal.data import load_dataset
from fedal.exceptions import ConfigError
from fedal.learner import ActiveLearner
from fedal.models import MLP, SklearnClassifier, TorchClassifier
from fedal.oracle import UNSURE, Oracle, SimulatedOracle
from fedal.pool import Pool
from fedal.stopping import AccuracyPlateau, BudgetExhausted, UncertaintyBelow
from fedal.strategies import QueryStrategy

N_CLASSES = 10


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", max_train=400, max_test=300)


def make_model(kind: str):
    if kind == "sklearn":
        return SklearnClassifier(LogisticRegression(max_iter=200), N_CLASSES)
    return TorchClassifier(lambda: MLP(64, N_CLASSES, hidden=(32, 16)), N_CLASSES, epochs=10, lr=1e-2, seed=0)


def make_learner(ds, model=None, strategy="entropy", *, pool=None, oracle=None, cold_start="random", **kwargs):
    pool = pool or Pool(N_CLASSES, size=len(ds.y_train))
    oracle = oracle or SimulatedOracle(ds.y_train, N_CLASSES)
    return ActiveLearner(model or make_model("sklearn"), strategy, ds.X_train, pool, oracle,
                         cold_start=cold_start, X_eval=ds.X_test, y_eval=ds.y_test, seed=0, **kwargs)


def labels_of(pool: Pool) -> dict[int, int]:
    ids, labels = pool.labels()
    return dict(zip(ids.tolist(), labels.tolist()))


class Spy(QueryStrategy):
    """Random selection that records what it was shown (and scores with the model, if it needs one)."""

    def __init__(self, needs_model: bool = True):
        self.needs_model = needs_model
        self.contexts = []

    def _select(self, ctx, budget, rng):
        self.contexts.append(ctx)
        if self.needs_model:
            ctx.probs()
        return rng.choice(len(ctx), size=budget, replace=False)


class RecordingModel:
    """Delegates to a model and logs which methods were called, in order."""

    def __init__(self, model):
        self.model, self.n_classes, self.log = model, model.n_classes, []

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        if callable(attr):
            def call(*args, **kwargs):
                self.log.append(name)
                return attr(*args, **kwargs)
            return call
        return attr


class BadAnswerOracle(Oracle):
    """Ground truth, except for the ids in ``bad`` (answered with a class that does not exist)
    and an answer for ``stray``, an id that was never asked."""

    name = "flaky"

    def __init__(self, labels, bad=(), stray=None):
        self.truth = SimulatedOracle(labels, N_CLASSES)
        self.bad, self.stray = set(bad), stray

    def label(self, ids):
        out = self.truth.label(ids)
        for i in ids:
            if int(i) in self.bad:
                out[int(i)] = N_CLASSES
        if self.stray is not None:
            out[self.stray] = 0
        return out


# ------------------------------------------------------------------------ steps
@pytest.mark.parametrize("kind", ["sklearn", "torch"])
def test_step_adds_exactly_the_budget_and_never_relabels(digits, kind):
    learner = make_learner(digits, make_model(kind))
    pool, previous = learner.pool, {}
    for step, budget in enumerate([12, 10, 15]):
        record = learner.step(budget)
        now = labels_of(pool)
        assert len(now) == len(previous) + budget
        assert {i: now[i] for i in previous} == previous  # old labels untouched
        new = set(now) - set(previous)
        assert all(now[i] == digits.y_train[i] for i in new)  # noise-free oracle: ground truth
        assert learner.history[-1] is record and len(learner.history) == step + 1
        assert (record.step, record.queried, record.labeled, record.unlabeled) == (
            step, budget, len(now), len(digits.y_train) - len(now))
        assert 0 <= record.accuracy <= 1 and math.isfinite(record.loss)
        assert pool.counts()["pending"] == 0
        previous = now
    # one request per labeled sample: nothing was asked twice
    assert sorted(r["sample_id"] for r in pool.requests()) == sorted(previous)
    records = pool.label_records()
    assert {r["source"] for r in records} == {"simulated"}
    assert sorted({r["round"] for r in records}) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["sklearn", "torch"])
def test_uncertainty_sampling_improves_on_the_initial_set(digits, kind):
    learner = make_learner(digits, make_model(kind), strategy="entropy")
    learner.step(20)  # cold start: random initial set
    for _ in range(4):
        learner.step(20)
    first, last = learner.history[0], learner.history[-1]
    assert last.labeled == 100
    assert last.accuracy > first.accuracy + 0.1, [round(h.accuracy, 3) for h in learner.history]
    assert math.isnan(first.mean_uncertainty)  # nothing trained when the initial set was chosen
    assert all(0 <= h.mean_uncertainty <= h.max_uncertainty <= 1 for h in learner.history[1:])


def test_row_of_each_non_contiguous_id(digits):
    ids = 1000 + 7 * np.arange(len(digits.y_train))
    pool = Pool(N_CLASSES, ids=ids)
    oracle = SimulatedOracle(digits.y_train, N_CLASSES, ids=ids)
    learner = make_learner(digits, pool=pool, oracle=oracle)
    learner.step(10)
    learner.step(10)
    X, y = learner.labeled_data()
    rows = (pool.labels()[0] - 1000) // 7
    assert len(rows) == 20
    assert np.array_equal(X, digits.X_train[rows]) and np.array_equal(y, digits.y_train[rows])


def test_one_row_per_pool_sample(digits):
    with pytest.raises(ConfigError, match="one row per sample"):
        make_learner(digits, pool=Pool(N_CLASSES, size=len(digits.y_train) - 1))


# ------------------------------------------------------------------ bad answers
def test_invalid_answer_warns_and_stays_pending(digits):
    learner = make_learner(digits, cold_start=Spy(needs_model=False))
    first_batch = learner.query(10, round=0)
    bad = int(first_batch[3])
    learner.oracle = BadAnswerOracle(digits.y_train, bad=[bad])
    with pytest.warns(UserWarning, match=f"sample {bad} stays pending") as caught:
        added, rejected = learner.teach(round=0)
    assert len(caught) == 1 and added == 9 and len(rejected) == 1 and str(N_CLASSES) in rejected[0]
    assert learner.pool.state_of(bad) == "pending"
    assert learner.pool.counts() == {"unlabeled": len(digits.y_train) - 10, "pending": 1, "labeled": 9}

    # later steps ask again (and warn again) but never select the pending sample anew
    with pytest.warns(UserWarning, match="stays pending"):
        record = learner.step(10)
    assert record.labeled == 19 and learner.pool.state_of(bad) == "pending"
    assert [r["sample_id"] for r in learner.pool.requests()].count(bad) == 1


def test_answer_for_a_sample_not_asked_is_ignored(digits):
    learner = make_learner(digits)
    stray = int(np.flatnonzero(digits.y_train != 0)[0])
    learner.pool.add_labeled({stray: digits.y_train[stray]}, source="initial")
    learner.oracle = BadAnswerOracle(digits.y_train, stray=stray)  # also "answers" stray with class 0
    with pytest.warns(UserWarning, match=f"sample {stray} has no pending request"):
        record = learner.step(10)
    assert record.labeled == 11  # the valid answers were all recorded
    assert labels_of(learner.pool)[stray] == digits.y_train[stray]  # and the stray one relabeled nothing


def test_an_unsure_answer_closes_the_request_and_the_sample_is_not_asked_again(digits):
    oracle = SimulatedOracle(digits.y_train, N_CLASSES, unsure_rate=0.3, seed=5)
    learner = make_learner(digits, oracle=oracle)
    learner.step(40)
    unsure = [i for i, a in oracle.label(range(len(digits.y_train))).items() if a is UNSURE]
    asked = [r["sample_id"] for r in learner.pool.requests()]
    skipped = [r["sample_id"] for r in learner.pool.requests("skipped")]
    assert skipped and set(skipped) == set(asked) & set(unsure)
    assert all(learner.pool.state_of(i) == "unlabeled" for i in skipped)
    assert learner.pool.counts()["labeled"] == 40 - len(skipped) and learner.pool.counts()["pending"] == 0
    for _ in range(4):
        learner.step(40)
    asked = [r["sample_id"] for r in learner.pool.requests()]
    assert len(asked) == len(set(asked)) == 200  # no sample asked twice, the unsure ones included
    assert set(learner.pool.skipped_ids().tolist()) == set(asked) & set(unsure)


# --------------------------------------------------------------------- stopping
def test_budget_exhausted_stops_exactly_at_the_total(digits):
    learner = make_learner(digits)
    reason = learner.run(10, stopping=[BudgetExhausted(35)])
    assert "35" in reason
    assert learner.pool.counts()["labeled"] == 35  # never more labels than the budget
    assert [h.queried for h in learner.history] == [10, 10, 10, 5]
    # the budget is spent: running again asks for nothing
    assert "35" in learner.run(10, stopping=[BudgetExhausted(35)])
    assert len(learner.history) == 4


def test_accuracy_plateau_stops(digits):
    learner = make_learner(digits)
    reason = learner.run(5, stopping=[AccuracyPlateau(patience=2, min_delta=1.0)])  # a gain of 1.0 is impossible
    assert "plateau" in reason and len(learner.history) == 3


def test_uncertainty_below_stops_once_the_model_scores_the_pool(digits):
    learner = make_learner(digits)
    reason = learner.run(10, stopping=[UncertaintyBelow(threshold=1.0)])
    assert "uncertainty" in reason
    # step 0 chose the initial set with no trained model (no uncertainty); step 1 measured it
    assert len(learner.history) == 2 and learner.history[1].max_uncertainty < 1.0


def test_run_stops_at_max_steps(digits):
    learner = make_learner(digits)
    assert learner.run(5, max_steps=2) == "reached max_steps=2"
    assert len(learner.history) == 2


def test_run_stops_when_the_pool_is_empty(digits):
    small = load_dataset("digits", max_train=25, max_test=50)
    learner = make_learner(small)
    with pytest.warns(UserWarning, match="exceeds"):  # the last step asks for more than is left
        reason = learner.run(10, max_steps=10)
    assert "no unlabeled sample" in reason
    assert learner.pool.counts()["labeled"] == 25 and len(learner.history) == 3


# ------------------------------------------------------------------ cold start, resume
def test_cold_start_strategy_picks_the_first_batch(digits):
    cold, main = Spy(needs_model=False), Spy()
    model = make_model("sklearn")
    learner = make_learner(digits, model, strategy=main, cold_start=cold)
    learner.step(10)
    assert len(cold.contexts) == 1 and not main.contexts
    assert cold.contexts[0].model is None  # a model-free cold start does not see the untrained model
    learner.step(10)
    assert len(cold.contexts) == 1 and len(main.contexts) == 1
    ctx = main.contexts[0]
    assert ctx.model is model and len(ctx.labeled_X) == 10 and len(ctx) == len(digits.y_train) - 10


def test_default_cold_start_is_the_one_every_entry_point_uses(digits):
    from fedal.config import DEFAULT_COLD_START, FederationConfig
    from fedal.strategies import get_strategy

    learner = ActiveLearner(make_model("sklearn"), "margin", digits.X_train, Pool(N_CLASSES, size=400),
                            SimulatedOracle(digits.y_train, N_CLASSES))
    assert type(learner.cold_start) is type(get_strategy(DEFAULT_COLD_START))
    assert FederationConfig().initial_strategy == DEFAULT_COLD_START
    record = learner.step(10)
    assert record.labeled == 10
    assert math.isnan(record.accuracy)  # no held-out set given


def test_reopened_pool_is_fitted_before_the_first_query(digits, tmp_path):
    path = tmp_path / "pool.sqlite"
    first = make_learner(digits, pool=Pool(N_CLASSES, size=400, path=path))
    first.step(10)
    first.step(10)
    labeled = labels_of(first.pool)
    first.pool.close()

    cold, main = Spy(needs_model=False), Spy()
    model = RecordingModel(make_model("sklearn"))
    resumed = make_learner(digits, model, strategy=main, cold_start=cold,
                           pool=Pool(N_CLASSES, size=400, path=path))
    record = resumed.step(5)
    assert not cold.contexts and len(main.contexts) == 1  # labels exist: no cold start
    assert model.log[0] == "fit"  # trained on the stored labels before scoring anything
    assert "forward" in model.log and model.log.index("fit") < model.log.index("forward")
    assert record.labeled == 25
    assert {i: labels_of(resumed.pool)[i] for i in labeled} == labeled
    resumed.pool.close()
