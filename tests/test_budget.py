"""BudgetCoordinator: how a round's label budget is split, capped, reallocated and carried."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedal.budget import BudgetCoordinator, ClientStats
from fedal.exceptions import ConfigError

POLICIES = ("uniform", "pool", "uncertainty")


def stats(**clients) -> dict[str, ClientStats]:
    """``stats(a=(unlabeled, uncertainty), b=None)``: None = absent client."""
    out = {}
    for name, value in clients.items():
        if value is None:
            out[name] = ClientStats(unlabeled=100, uncertainty=0.5, available=False)
        else:
            unlabeled, uncertainty = value
            out[name] = ClientStats(unlabeled=unlabeled, uncertainty=uncertainty)
    return out


# ------------------------------------------------------------- hand-computed shares
def test_uniform_splits_equally_and_hands_the_remainder_out_by_name():
    coord = BudgetCoordinator("uniform", round_budget=10)
    assert coord.allocate(2, stats(a=(100, 0.1), b=(100, 0.9), c=(100, 0.5))) == {"a": 4, "b": 3, "c": 3}


def test_pool_policy_is_proportional_to_unlabeled_pool_size():
    coord = BudgetCoordinator("pool", round_budget=12)
    # 60 : 30 : 30 -> 6 : 3 : 3
    assert coord.allocate(2, stats(a=(60, 0.1), b=(30, 0.1), c=(30, 0.1))) == {"a": 6, "b": 3, "c": 3}


def test_uncertainty_policy_is_proportional_to_mean_uncertainty():
    coord = BudgetCoordinator("uncertainty", round_budget=10)
    assert coord.allocate(2, stats(a=(100, 0.6), b=(100, 0.3), c=(100, 0.1))) == {"a": 6, "b": 3, "c": 1}


def test_pool_policy_rounding_ties_are_broken_by_client_name():
    coord = BudgetCoordinator("pool", round_budget=10)
    # raw shares 7.5 and 2.5: both remainders 0.5, the spare label goes to "a"
    assert coord.allocate(2, stats(a=(30, 0.0), b=(10, 0.0))) == {"a": 8, "b": 2}


def test_client_that_has_not_reported_gets_the_average_weight():
    coord = BudgetCoordinator("uncertainty", round_budget=9)
    s = stats(a=(100, 0.2), b=(100, 0.4))
    s["new"] = ClientStats()  # never reported: weight = mean(0.2, 0.4) = 0.3
    assert coord.allocate(2, s) == {"a": 2, "b": 4, "new": 3}


def test_water_filling_gives_what_a_small_pool_cannot_take_to_the_others():
    coord = BudgetCoordinator("uniform", round_budget=12)
    # equal shares 4/4/4, but "a" has 2 unlabeled left: its 2 spare labels go to b and c
    assert coord.allocate(2, stats(a=(2, 0.5), b=(100, 0.5), c=(100, 0.5))) == {"a": 2, "b": 5, "c": 5}


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("policy", POLICIES)
def test_budgets_sum_to_the_round_budget_when_capacity_allows(policy):
    coord = BudgetCoordinator(policy, round_budget=37)
    out = coord.allocate(2, stats(a=(500, 0.9), b=(80, 0.2), c=(300, 0.05), d=(40, 0.6)))
    assert sum(out.values()) == 37
    assert all(v >= 0 for v in out.values())


@pytest.mark.parametrize("policy", POLICIES)
def test_per_client_cap_is_respected_and_the_rest_reallocated(policy):
    coord = BudgetCoordinator(policy, round_budget=20, client_cap=6)
    out = coord.allocate(2, stats(a=(500, 0.9), b=(500, 0.1), c=(500, 0.1), d=(500, 0.1)))
    assert max(out.values()) <= 6
    assert sum(out.values()) == 20  # capacity 24 >= 20: nothing lost to the cap


@pytest.mark.parametrize("policy", POLICIES)
def test_exhausted_pool_and_absent_client_get_zero_and_their_share_goes_to_others(policy):
    coord = BudgetCoordinator(policy, round_budget=30)
    out = coord.allocate(2, stats(empty=(0, 0.9), gone=None, b=(200, 0.4), c=(200, 0.4)))
    assert out["empty"] == 0
    assert out["gone"] == 0
    assert out["b"] + out["c"] == 30


@pytest.mark.parametrize("policy", POLICIES)
def test_total_capacity_below_budget_gives_everything_there_is(policy):
    coord = BudgetCoordinator(policy, round_budget=100, client_cap=10)
    out = coord.allocate(2, stats(a=(4, 0.9), b=(50, 0.1), c=(7, 0.3), gone=None))
    assert out == {"a": 4, "b": 10, "c": 7, "gone": 0}
    assert sum(out.values()) == 21  # = total capacity


@pytest.mark.parametrize("policy", POLICIES)
def test_random_federations_never_break_the_capacity_or_sum_rules(policy):
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 8))
        budget = int(rng.integers(0, 120))
        cap = int(rng.integers(0, 30))
        s = {f"c{i}": ClientStats(unlabeled=int(rng.integers(0, 60)), uncertainty=float(rng.random()),
                                  available=bool(rng.random() > 0.2)) for i in range(n)}
        coord = BudgetCoordinator(policy, round_budget=budget, client_cap=cap)
        out = coord.allocate(2, s)
        capacity = {c: 0 if not v.available else min(v.unlabeled, cap or v.unlabeled) for c, v in s.items()}
        for c, b in out.items():
            assert 0 <= b <= capacity[c], (trial, c, b, capacity[c])
        assert sum(out.values()) == min(budget, sum(capacity.values())), trial


def test_zero_budget_gives_zero_to_everyone():
    coord = BudgetCoordinator("uncertainty", round_budget=0)
    assert coord.allocate(2, stats(a=(10, 0.5), b=(10, 0.5))) == {"a": 0, "b": 0}


# ------------------------------------------------------------- carry-over, ledger
def test_failed_clients_budget_is_carried_to_the_next_round():
    coord = BudgetCoordinator("uniform", round_budget=10)
    first = coord.allocate(2, stats(a=(100, 0.5), b=(100, 0.5)))
    assert first == {"a": 5, "b": 5}
    coord.record_spent(2, "a", 5)
    coord.record_spent(2, "b", None, failed=True)
    second = coord.allocate(3, stats(a=(95, 0.5), b=(100, 0.5)))
    assert sum(second.values()) == 15  # 10 + the 5 b never used
    third = coord.allocate(4, stats(a=(90, 0.5), b=(95, 0.5)))
    assert sum(third.values()) == 10  # carried once, not forever


def test_carry_over_can_be_switched_off():
    coord = BudgetCoordinator("uniform", round_budget=10, carry_over=False)
    coord.allocate(2, stats(a=(100, 0.5), b=(100, 0.5)))
    coord.record_spent(2, "b", None, failed=True)
    assert sum(coord.allocate(3, stats(a=(100, 0.5), b=(100, 0.5))).values()) == 10


def test_ledger_keeps_assigned_and_spent_per_round_and_client():
    coord = BudgetCoordinator("uniform", round_budget=8)
    coord.allocate(2, stats(a=(100, 0.5), b=(100, 0.5)))
    coord.record_spent(2, "a", 3)
    coord.record_spent(2, "b", None, failed=True)
    rows = {(r.round, r.client): (r.assigned, r.spent, r.status) for r in coord.ledger}
    assert rows == {(2, "a"): (4, 3, "spent"), (2, "b"): (4, 0, "failed")}
    assert coord.assigned(2) == {"a": 4, "b": 4}
    assert coord.assigned(3) == {}


def test_spending_more_than_assigned_is_an_error():
    coord = BudgetCoordinator("uniform", round_budget=4)
    coord.allocate(2, stats(a=(100, 0.5), b=(100, 0.5)))
    with pytest.raises(ConfigError, match=r"client a reports 3 queries in round 2 but was assigned 2"):
        coord.record_spent(2, "a", 3)


def test_spending_without_an_assignment_is_an_error():
    coord = BudgetCoordinator("uniform", round_budget=4)
    coord.allocate(2, stats(a=(100, 0.5)))
    with pytest.raises(ConfigError, match="no budget was assigned to client zz in round 2"):
        coord.record_spent(2, "zz", 1)
    with pytest.raises(ConfigError, match="in round 9"):
        coord.record_spent(9, "a", 0)


def test_state_dict_round_trip_restores_ledger_and_carry():
    coord = BudgetCoordinator("pool", round_budget=10)
    coord.allocate(2, stats(a=(30, 0.5), b=(10, 0.5)))
    coord.record_spent(2, "a", 8)
    coord.record_spent(2, "b", None, failed=True)
    state = json.loads(json.dumps(coord.state_dict()))  # what a checkpoint stores
    restored = BudgetCoordinator("pool", round_budget=10)
    restored.load_state_dict(state)
    assert restored.carry == coord.carry == 2
    assert restored.ledger == coord.ledger
    nxt = stats(a=(22, 0.5), b=(10, 0.5))
    assert restored.allocate(3, nxt) == coord.allocate(3, nxt)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, words", [
    ({"policy": "fair"}, "budget policy must be one of"),
    ({"round_budget": -1}, "round budget must be >= 0"),
    ({"client_cap": -3}, "client cap must be >= 0"),
])
def test_bad_arguments_name_the_problem(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        BudgetCoordinator(**kwargs)


def test_unknown_uncertainty_everywhere_falls_back_to_uniform():
    coord = BudgetCoordinator("uncertainty", round_budget=6)
    s = {c: ClientStats(unlabeled=50, uncertainty=math.nan) for c in "abc"}
    assert coord.allocate(2, s) == {"a": 2, "b": 2, "c": 2}
