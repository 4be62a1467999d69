"""The contract every registered query strategy must honour (new strategies are covered
automatically: the tests are parametrised over ``available_strategies()``)."""
from __future__ import annotations

import numpy as np
import pytest
from strategy_helpers import FakeModel

from fedal.exceptions import ConfigError, EmptyPoolError, UnknownStrategyError
from fedal.strategies import PoolExhaustedWarning, QueryContext, ScoreStrategy, available_strategies, get_strategy

STRATEGIES = available_strategies()
N_POOL, N_FEATURES = 40, 5


def head_model(seed: int = 0):
    """A closed-form LDA head trained on random labels of the same kind of features."""
    from fedal.models import HeadClassifier

    rng = np.random.default_rng(seed + 100)
    model = HeadClassifier(3, N_FEATURES)
    model.fit(rng.normal(size=(30, N_FEATURES)), rng.integers(0, 3, 30))
    return model


def make_context(model=None, n_pool=N_POOL, with_labeled=True, seed=0) -> QueryContext:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_pool, N_FEATURES)).astype(np.float32)
    ids = rng.permutation(np.arange(10_000, 10_000 + 7 * n_pool, 7))[:n_pool]  # shuffled, not 0..n-1
    labeled_X = rng.normal(size=(8, N_FEATURES)).astype(np.float32) if with_labeled else None
    return QueryContext(ids=ids, X=X, model=model or FakeModel(N_FEATURES), labeled_X=labeled_X)


def query(name, ctx, budget, seed=0):
    strategy = get_strategy(name)
    if strategy.needs_closed_form and not getattr(ctx.model, "closed_form", False):
        ctx = QueryContext(ids=ctx.ids, X=ctx.X, model=head_model(), labeled_X=ctx.labeled_X)
    return strategy.query(ctx, budget, seed=seed)


@pytest.mark.parametrize("with_labeled", [True, False], ids=["labeled", "cold"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_returns_budget_distinct_candidates(name, with_labeled):
    ctx = make_context(with_labeled=with_labeled)
    chosen = query(name, ctx, 7)
    assert chosen.dtype == np.int64 and chosen.shape == (7,)
    assert len(set(chosen.tolist())) == 7
    assert set(chosen.tolist()) <= set(ctx.ids.tolist())


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_ids(name):
    first = query(name, make_context(), 9, seed=3)
    again = query(name, make_context(), 9, seed=3)  # fresh context: nothing cached
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", STRATEGIES)
def test_candidate_container_does_not_matter(name):
    ctx = make_context()
    as_list = QueryContext(ids=ctx.ids.tolist(), X=list(ctx.X), model=ctx.model, labeled_X=ctx.labeled_X)
    np.testing.assert_array_equal(query(name, ctx, 5, seed=1), query(name, as_list, 5, seed=1))


@pytest.mark.parametrize("name", STRATEGIES)
def test_budget_zero_gives_empty(name):
    chosen = query(name, make_context(), 0)
    assert chosen.shape == (0,) and chosen.dtype == np.int64


@pytest.mark.parametrize("name", STRATEGIES)
def test_budget_over_pool_returns_whole_pool_with_warning(name):
    ctx = make_context(n_pool=12)
    with pytest.warns(PoolExhaustedWarning, match="exceeds"):
        chosen = query(name, ctx, 20)
    assert sorted(chosen.tolist()) == sorted(ctx.ids.tolist())


@pytest.mark.parametrize("name", STRATEGIES)
def test_single_candidate(name):
    ctx = make_context(n_pool=1)
    assert query(name, ctx, 1).tolist() == ctx.ids.tolist()


@pytest.mark.parametrize("name", STRATEGIES)
def test_empty_pool_raises(name):
    ctx = QueryContext(ids=np.zeros(0, dtype=np.int64), X=np.zeros((0, N_FEATURES)), model=FakeModel(N_FEATURES))
    with pytest.raises(EmptyPoolError, match="pool has no unlabeled sample"):
        query(name, ctx, 3)


@pytest.mark.parametrize("budget", [-1, 2.5, "3", True, None])
@pytest.mark.parametrize("name", STRATEGIES)
def test_bad_budget_raises(name, budget):
    with pytest.raises(ConfigError, match="budget"):
        query(name, make_context(), budget)


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownStrategyError) as err:
        get_strategy("no_such_strategy")
    assert "no_such_strategy" in str(err.value)
    assert all(name in str(err.value) for name in STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_model_requirement_is_declared(name):
    strategy = get_strategy(name)
    ctx = make_context()
    ctx.model = None
    if strategy.needs_model:
        with pytest.raises(ConfigError, match="model"):
            strategy.query(ctx, 3, seed=0)
    else:
        assert len(strategy.query(ctx, 3, seed=0)) == 3


@pytest.mark.parametrize("name", [n for n in STRATEGIES if isinstance(get_strategy(n), ScoreStrategy)])
def test_scores_are_finite_per_candidate(name):
    ctx = make_context()
    scores = get_strategy(name).score(ctx, np.random.default_rng(0))
    assert scores.shape == (N_POOL,) and np.all(np.isfinite(scores))


# --------------------------------------------------------------- real model adapters
models = pytest.importorskip("fedal.models")


@pytest.fixture(scope="module", params=["mlp", "cnn", "sklearn", "head"])
def fitted_model(request):
    """A real adapter fitted once on 10 labeled samples, with 20 more as the pool."""
    rng = np.random.default_rng(1)
    if request.param == "cnn":
        X = rng.random((30, 3, 28, 28), dtype=np.float32)
        model = models.TorchClassifier(lambda: models.SmallCNN(3, 4), 4, epochs=1, seed=0)
    elif request.param == "head":
        X = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
        model = models.HeadClassifier(3, N_FEATURES)
    elif request.param == "mlp":
        X = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
        model = models.TorchClassifier(lambda: models.MLP(N_FEATURES, 3), 3, epochs=2, seed=0)
    else:
        from sklearn.linear_model import LogisticRegression

        X = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
        model = models.SklearnClassifier(LogisticRegression(max_iter=200), 3, seed=0)
    model.fit(X[:10], np.arange(10) % model.n_classes)
    return model, X


@pytest.mark.parametrize("name", STRATEGIES)
def test_real_model_adapters(fitted_model, name):
    model, X = fitted_model
    ids = np.random.default_rng(2).permutation(np.arange(500, 520))

    def run():
        ctx = QueryContext(ids=ids, X=X[10:], model=model, labeled_X=X[:10])
        return get_strategy(name).query(ctx, 6, seed=2)

    if get_strategy(name).needs_closed_form and not getattr(model, "closed_form", False):
        with pytest.raises(ConfigError, match="closed-form LDA head"):  # said, not silently replaced
            run()
        return
    first, again = run(), run()
    assert len(set(first.tolist())) == 6 and set(first.tolist()) <= set(range(500, 520))
    np.testing.assert_array_equal(first, again)
