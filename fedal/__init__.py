"""fedal: federated and on-device active learning.

The core (this package) needs no Flower: strategies, pool, oracles, learner,
stopping criteria, data loaders and models work on one device. ``clients/`` and
``server/`` build the Flower federation on top of it.
"""
from fedal.exceptions import (
    ConfigError,
    DataFileError,
    EmptyPoolError,
    FedalError,
    InvalidLabelError,
    UnknownStrategyError,
)
from fedal.learner import ActiveLearner
from fedal.oracle import Oracle, SimulatedOracle
from fedal.pool import Pool
from fedal.strategies import QueryContext, available_strategies, get_strategy

__version__ = "0.1.0"

__all__ = [
    "ActiveLearner", "ConfigError", "DataFileError", "EmptyPoolError", "FedalError", "InvalidLabelError",
    "Oracle", "Pool", "QueryContext", "SimulatedOracle", "UnknownStrategyError", "available_strategies",
    "get_strategy", "__version__",
]
