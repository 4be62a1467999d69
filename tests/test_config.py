"""FederationConfig: one source of defaults, every bad value named, TOML and run-config loading."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

# setting -> a value it must refuse (each is checked to be refused with the setting's name)
BAD_VALUES = {
    "clients": 0,
    "partition": "shards",
    "alpha": -1.0,
    "classes_per_client": 0,
    "local_test_fraction": 1.0,
    "pipeline": "deep",
    "features": "pixels",
    "input_size": 4,
    "resize_policy": "stretch",
    "site_data": "sites/site",
    "pseudo_label_threshold": 1.5,
    "head_shrinkage": 2.0,
    "head_clip_norm": -1.0,
    "head_dp_noise": 1.0,
    "head_dp_epsilon": -1.0,
    "head_dp_releases": 0,
    "head_dp_release_growth": 1.0,
    "strategy": "nope",
    "strategy_options": "no_such_option=3",
    "initial_strategy": "entropy",
    "initial_strategy_options": "k_neighbors=0",
    "initial_labels": 0,
    "budget_policy": "fair",
    "round_budget": -5,
    "client_cap": -1,
    "rounds": 0,
    "query_every": 0,
    "local_epochs": 0,
    "min_local_steps": -1,
    "batch_size": 0,
    "lr": 0.0,
    "local_optimizer": "lbfgs",
    "restricted_softmax": 0.0,
    "network": "resnet152",
    "norm": "layer",
    "augment": "rotate",
    "local_steps": -1,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "consistency": -1.0,
    "consistency_threshold": 0.0,
    "lr_schedule": "step",
    "eval_every": 0,
    "aggregation": "fedsgd",
    "proximal_mu": -0.1,
    "server_lr": 0.0,
    "server_momentum": 1.0,
    "fraction_train": 0.0,
    "min_clients": 99,
    "round_timeout": 0.0,
    "min_reply_fraction": 1.5,
    "max_failed_rounds": -1,
    "noise_rate": 1.5,
    "noise_kind": "gaussian",
    "client_noise": "0.1,oops",
    "unsure_rate": 1.0,
    "verify_threshold": 1.5,
    "seed": -1,
    "max_train": -10,
    "n_classes": 1,
    "output_dir": "",
    "local_model_epochs": -1,
    "query_timeout": -1.0,
    "stop_when": "boredom",
    "stop_patience": 0,
    "stop_min_delta": -1.0,
    "stop_uncertainty": 2.0,
    "total_budget": -1,
    "offline_budget": -1,
    "after_stop": "pause",
    "dp_clipping_norm": -1.0,
    "dp_noise_multiplier": -0.5,
    "dp_mode": "everywhere",
    "dp_delta": 0.0,
    "secure_threshold": 1.5,
    "secure_clip_norm": 0.0,
    "secure_max_count": 0,
    "min_class_count": -2,
    "ray_address": "head-node",
    "actor_cpus": 0.0,
    "actor_gpus": 1.5,
    "actor_memory_gib": -1.0,
}
# second bad values for settings with two bounds
MORE_BAD_VALUES = [("total_budget", 49), ("dp_mode", "local"), ("dp_delta", 1.0), ("client_noise", "0.1,0.2"), ("client_noise", "2,0,0,0,0"),
                   ("unsure_rate", -0.1), ("verify_threshold", -0.1),
                   ("momentum", -0.5), ("min_reply_fraction", -0.1), ("min_reply_fraction", float("nan")),
                   ("head_dp_epsilon", 3.0), ("head_dp_epsilon", float("inf")),
                   ("ray_address", "10.0.0.5:70000"), ("ray_address", "http://10.0.0.5:6379"), ("actor_gpus", -0.5),
                   ("actor_cpus", float("nan")), ("actor_memory_gib", float("inf"))]
# settings any value of their type is fine for (checked where they are used: data loading)
FREE_SETTINGS = {"dataset", "data_dir", "state_dir", "reinit", "resume", "overwrite", "secure_aggregation"}


def test_defaults_validate():
    cfg = FederationConfig()
    assert cfg.validate() is cfg


def test_every_setting_is_either_checked_here_or_known_to_be_free():
    assert set(BAD_VALUES) | FREE_SETTINGS == set(FederationConfig.field_names())


@pytest.mark.parametrize("name, value", sorted(BAD_VALUES.items()) + MORE_BAD_VALUES)
def test_bad_value_raises_config_error_naming_the_setting(name, value):
    kebab = name.replace("_", "-")
    with pytest.raises(ConfigError) as err:
        FederationConfig(**{name: value})
    assert kebab in str(err.value), str(err.value)
    # the same refusal through the run-config path, with kebab-case keys
    with pytest.raises(ConfigError, match=kebab):
        FederationConfig.from_run_config({kebab: value})


@pytest.mark.parametrize("key, value", [
    ("clients", "three"), ("clients", 2.5), ("clients", True), ("lr", "fast"), ("reinit", "maybe"), ("reinit", 2),
])
def test_wrong_types_are_refused_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=f"setting {key} must be an? (int|float|bool)"):
        FederationConfig.from_mapping({key: value})


def test_values_are_converted_from_strings_and_kebab_case():
    cfg = FederationConfig.from_mapping({"round-budget": "20", "lr": "0.01", "reinit": "true", "clients": 3.0})
    assert (cfg.round_budget, cfg.lr, cfg.reinit, cfg.clients) == (20, 0.01, True, 3)


def test_unknown_key_lists_the_known_settings():
    with pytest.raises(ConfigError) as err:
        FederationConfig.from_mapping({"round-budgt": 5})
    message = str(err.value)
    assert "unknown setting 'round-budgt'" in message
    for name in FederationConfig.field_names():
        assert name.replace("_", "-") in message


def test_run_config_ignores_keys_that_are_not_fedal_settings():
    cfg = FederationConfig.from_run_config({"rounds": 2, "num-server-rounds": 9, "fraction-fit": 0.5})
    assert cfg.rounds == 2


def test_to_run_config_round_trips():
    cfg = FederationConfig(clients=3, alpha=0.1, strategy="margin", reinit=True, output_dir="/tmp/x")
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg


def test_from_toml_flat_and_under_fedal_table(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('clients = 3\nround-budget = 20\nstrategy = "margin"\n')
    table = tmp_path / "table.toml"
    table.write_text('[fedal]\nclients = 4\nbudget_policy = "pool"\n')
    a = FederationConfig.from_toml(flat)
    b = FederationConfig.from_toml(table)
    assert (a.clients, a.round_budget, a.strategy) == (3, 20, "margin")
    assert (b.clients, b.budget_policy) == (4, "pool")
    assert b.round_budget == FederationConfig().round_budget  # untouched settings keep the defaults


def test_from_toml_on_top_of_a_base(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("rounds = 4\n")
    cfg = FederationConfig.from_toml(path, base=FederationConfig(clients=7, min_clients=2))
    assert (cfg.rounds, cfg.clients) == (4, 7)


def test_from_toml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FederationConfig.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("clients = = 3\n")
    with pytest.raises(ConfigError, match=f"config file {broken} is not valid TOML"):
        FederationConfig.from_toml(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text("clients = 0\n")
    with pytest.raises(ConfigError, match="clients must be >= 1"):
        FederationConfig.from_toml(bad)


def test_pyproject_run_config_is_exactly_the_dataclass_defaults():
    """``[tool.flwr.app.config]`` (what ``flwr run .`` uses) must equal FederationConfig()."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = FederationConfig().to_run_config()
    assert list(run_config) == list(defaults)  # same keys, same order
    typed = lambda d: {k: (type(v).__name__, v) for k, v in d.items()}  # 1 vs 1.0 must differ
    assert typed(run_config) == typed(defaults)


def test_config_is_a_plain_dataclass_with_validated_defaults():
    # every default of the dataclass is also what the CLI and flwr get: no second table of defaults
    for f in dataclasses.fields(FederationConfig):
        assert f.default is not dataclasses.MISSING, f.name


def test_the_config_is_frozen_and_replace_validates():
    cfg = FederationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3
    assert cfg.replace(rounds=3).rounds == 3 and cfg.rounds == 8
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        cfg.replace(rounds=0)


def test_strategy_names_have_one_spelling_and_one_check():
    from fedal.strategies import available_strategies

    cfg = FederationConfig(strategy="Entropy", initial_strategy="TypiClust")
    assert (cfg.strategy, cfg.initial_strategy) == ("entropy", "typiclust")
    assert FederationConfig(strategy="kafal-diverse").strategy == "kafal_diverse"
    with pytest.raises(ConfigError) as err:  # a cold start must need no model: checked by the registry
        FederationConfig(initial_strategy="margin")
    assert "random" in str(err.value) and "typiclust" in str(err.value)
    with pytest.raises(ConfigError) as err:
        FederationConfig(strategy="entrop")
    assert all(name in str(err.value) for name in available_strategies())


def test_strategy_options_reach_the_strategies_from_toml_flags_and_run_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "bald"\nstrategy-options = { n-samples = 7 }\n'
                    'initial-strategy = "typiclust"\ninitial-strategy-options = "k_neighbors=5, use_embeddings=false"\n')
    cfg = FederationConfig.from_toml(path)
    assert cfg.strategy_options == "n_samples=7"
    assert cfg.initial_strategy_options == "k_neighbors=5,use_embeddings=false"
    assert cfg.query_strategy().n_samples == 7 and cfg.cold_start_strategy().k_neighbors == 5
    # the run config (what Flower carries) holds the one text form and gives the same strategies back
    again = FederationConfig.from_run_config(cfg.to_run_config())
    assert again == cfg and again.query_strategy().n_samples == 7
    assert FederationConfig.from_mapping({"strategy": "logo", "strategy-options": "features=embedding"}
                                         ).query_strategy().features == "embedding"


@pytest.mark.parametrize("options, words", [
    ("n_samples", "key=value pairs"),
    ("n_sampels=5", "bald has no option n_sampels; its options are n_samples"),
    ("n_samples=1", "n_samples"),
    ("n_samples=[1]", "must be a number"),
])
def test_bad_strategy_options_name_the_option_and_the_known_ones(options, words):
    with pytest.raises(ConfigError, match="strategy-options") as err:
        FederationConfig(strategy="bald", strategy_options=options)
    assert words in str(err.value)


@pytest.mark.parametrize("setting, value, words", [
    ("aggregation", "krum", "the head pipeline sums the clients' statistics"),
    ("dp_clipping_norm", 1.0, "set pipeline = network to use dp-clipping-norm"),
])
def test_network_only_settings_are_refused_with_the_head_pipeline(setting, value, words):
    with pytest.raises(ConfigError, match=words):
        FederationConfig(**{setting: value})
    assert getattr(FederationConfig(pipeline="network", **{setting: value}), setting) == value


def test_a_config_file_that_is_not_utf8_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('dataset = "d\xe9mo"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text.*save it as UTF-8"):
        FederationConfig.from_toml(path)


def test_a_total_budget_below_the_initial_labels_is_refused_and_its_help_says_they_count():
    """Issue 21.9: the clients' initial labels count toward total-budget (5 clients x 10 by default)."""
    with pytest.raises(ConfigError, match=r"total-budget 49 is below the initial labels of all clients "
                                          r"\(5 clients x initial-labels 10 = 50\)"):
        FederationConfig(total_budget=49)
    assert FederationConfig(total_budget=50).total_budget == 50
    from simulations.simulate import _field_help

    assert "initial labels of every client included" in _field_help()["total_budget"]


@pytest.mark.parametrize("strategy, fires", [("entropy", False), ("margin", False), ("least_confidence", False),
                                             ("bald", False), ("qbc_vote_entropy", False), ("random", True),
                                             ("badge", True), ("coreset", True)])
def test_verify_threshold_says_when_its_second_readings_cannot_fire(strategy, fires):
    """Issue 21.12: uncertainty strategies query what the model is unsure of, so a confident disagreement
    (what a second reading is asked on) almost never happens: the run says so, the help and README too."""
    note = FederationConfig(strategy=strategy, verify_threshold=0.9).verify_note()
    assert (note is None) == fires
    if not fires:
        assert f"strategy {strategy} picks the samples the model is least sure of" in note and "random" in note
    assert FederationConfig(strategy=strategy).verify_note() is None  # no second readings asked for


def test_verify_threshold_help_and_readme_name_the_uncertainty_strategies():
    from pathlib import Path

    from simulations.simulate import _field_help

    text = _field_help()["verify_threshold"]
    assert "entropy, margin" in text and "almost no second reading is made" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "almost no second reading is made" in readme


def test_paths_typed_by_a_user_are_made_absolute_where_they_were_typed(tmp_path):
    """A deployment's ServerApp reads the run config in the SuperLink's folder: a relative data-dir there named
    another folder and the run failed with nothing but `finished:failed`."""
    from fedal.config import absolute_paths

    (tmp_path / "mine.npz").write_bytes(b"")
    given = {"data-dir": "../shared/data", "output_dir": "runs/x", "state-dir": "~/state", "dataset": "mine.npz",
             "rounds": 3, "strategy": "margin"}
    out = absolute_paths(given, base=tmp_path)
    assert out["data-dir"] == str((tmp_path / "../shared/data").resolve())
    assert out["output_dir"] == str(tmp_path / "runs" / "x")
    assert out["state-dir"] == str(Path("~/state").expanduser())
    assert out["dataset"] == str(tmp_path / "mine.npz")
    assert (out["rounds"], out["strategy"]) == (3, "margin")  # not paths: as given
    # a named data set, a .npz that is not here (looked up in data-dir), an empty default and an absolute path stay
    same = {"dataset": "bloodmnist", "data-dir": "", "output-dir": str(tmp_path / "abs")}
    assert absolute_paths(same, base=tmp_path) == same
    assert absolute_paths({"dataset": "other.npz"}, base=tmp_path) == {"dataset": "other.npz"}
    assert given["data-dir"] == "../shared/data"  # the caller's mapping is left alone


def test_a_missing_relative_data_dir_says_from_which_folder_it_was_read(tmp_path, monkeypatch):
    from fedal.data import load_dataset
    from fedal.exceptions import DataFileError
    from fedal.sitedata import load_site

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileError) as info:
        load_dataset("bloodmnist", "../nowhere")
    message = str(info.value)
    assert f"read as {tmp_path.parent / 'nowhere'}" in message and f"working directory {tmp_path}" in message
    assert "give an absolute path" in message
    with pytest.raises(DataFileError, match=f"site data file site-0.npz \\(relative, so read as {tmp_path}/site-0.npz"):
        load_site("site-0.npz")
