"""Per-site data files (``fedal split``, ``data-path`` in the node config)."""
from __future__ import annotations

import numpy as np
import pytest
from site_helpers import global_state, make_site, site_config

from clients.node import NodeConfig
from clients.site import ClientSite
from fedal.exceptions import ConfigError, DataFileError
from fedal.federation import client_data
from fedal.messages import TrainInstruction
from fedal.sitedata import load_site, split_sites
from simulations import cli


def test_split_cuts_exactly_as_the_simulation(tmp_path):
    cfg = site_config(tmp_path, clients=3, min_clients=3)
    paths = split_sites(cfg, tmp_path / "sites")
    assert [p.name for p in paths] == ["site-0.npz", "site-1.npz", "site-2.npz"]
    for cid, path in enumerate(paths):
        site, sim = load_site(path, cid), client_data(cfg, cid)
        np.testing.assert_array_equal(site.X_pool, sim.X_pool)
        np.testing.assert_array_equal(site.y_pool, sim.y_pool)
        np.testing.assert_array_equal(site.X_test, sim.X_test)
        assert (site.n_classes, site.class_names, site.kind) == (sim.n_classes, sim.class_names, sim.kind)
    unlabeled = load_site(split_sites(cfg, tmp_path / "nolabels", include_labels=False)[0])
    assert (unlabeled.y_pool == -1).all() and len(unlabeled.y_test) == len(client_data(cfg, 0).y_test)


def test_client_site_reads_only_its_file(tmp_path, monkeypatch):
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, client_id=1, oracle="simulated", labels=True)

    def no_simulation(*args, **kwargs):
        raise AssertionError("a deployed site must not load the whole data set")

    monkeypatch.setattr("clients.site.client_data", no_simulation)
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    try:
        _, report = site.train(global_state(site), TrainInstruction(1, 0))
    finally:
        site.close()
    assert report.client_id == 1 and report.num_examples == cfg.initial_labels
    assert report.unlabeled_left == len(load_site(node["data-path"]).y_pool) - cfg.initial_labels


def test_simulated_oracle_needs_labels_and_unknown_oracles_are_named(tmp_path):
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="simulated", labels=False)
    with pytest.raises(ConfigError, match='set oracle="web" or oracle="file"'):
        ClientSite(cfg, NodeConfig.from_mapping(node))
    with pytest.raises(ConfigError, match="unknown oracle 'person' in the node config; choose one of simulated, web, file"):
        ClientSite(cfg, NodeConfig.from_mapping({**node, "oracle": "person"}))


def test_node_config_keys_are_checked_once_and_a_typo_names_the_known_keys():
    from clients.node import NODE_KEYS, NodeConfig

    node = NodeConfig.from_mapping({"client-id": 3, "data-path": "s.npz", "oracle": "web", "label-wait": 5,
                                    "query-timeout": "60"})
    assert (node.client_id, node.data_path, node.oracle, node.label_wait, node.query_timeout) == (3, "s.npz", "web",
                                                                                                 5.0, 60.0)
    assert NodeConfig.from_mapping({"partition-id": 1, "num-partitions": 4}).client_id == 1  # Flower's simulation
    with pytest.raises(ConfigError) as err:
        NodeConfig.from_mapping({"client-id": 0, "stat-dir": "/tmp/x"})
    assert "'stat-dir'" in str(err.value) and all(key in str(err.value) for key in NODE_KEYS)
    for bad, words in [({"client-id": "zero"}, "client-id must be an integer"), ({"client-id": -1}, ">= 0"),
                       ({}, "neither client-id nor partition-id"), ({"client-id": 0, "label-wait": -2}, "label-wait"),
                       ({"client-id": 0, "oracle": "person"}, "unknown oracle 'person'")]:
        with pytest.raises(ConfigError, match=words):
            NodeConfig.from_mapping(bad)


def test_hand_made_site_files_in_every_image_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(5, 28, 28, 3), dtype=np.uint8)
    expected = raw.transpose(0, 3, 1, 2).astype(np.float32) / 255
    for name, x in {"nhwc": raw, "nchw": raw.transpose(0, 3, 1, 2), "float": raw / 255.0}.items():
        np.savez(tmp_path / f"{name}.npz", x_pool=x, class_names=np.array(["a", "b", "c"]))
        site = load_site(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(site.X_pool, expected, atol=1e-6)
        assert site.kind == "image" and (site.y_pool == -1).all() and len(site.y_test) == 0
    grey = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x_pool=grey, class_names=np.array(["normal", "pneumonia"]), y_pool=[0, 1, -1, 1])
    assert load_site(tmp_path / "grey.npz").X_pool.shape == (4, 1, 28, 28)


@pytest.mark.parametrize("arrays, message", [
    ({"x_pool": np.zeros((3, 4))}, "needs at least x_pool and class_names"),
    ({"x_pool": np.zeros((3, 4)), "class_names": np.array(["only"])}, "a classifier needs >= 2"),
    ({"x_pool": np.zeros((3, 4)), "class_names": np.array(["a", "b"]), "y_pool": [0, 2, 1]}, "outside -1..1"),
    ({"x_pool": np.zeros((3, 4)), "class_names": np.array(["a", "b"]), "y_pool": [0, 1]}, "expected (3,)"),
    ({"x_pool": np.zeros((3, 4)), "class_names": np.array(["a", "b"]), "x_test": np.zeros((2, 4))}, "no y_test"),
    ({"x_pool": np.zeros((3, 4)), "class_names": np.array(["a", "b"]), "x_test": np.zeros((2, 5)),
      "y_test": [0, 1]}, "differ from x_pool rows"),
    ({"x_pool": np.zeros((3, 6, 6)), "class_names": np.array(["a", "b"])}, "at least 8x8"),
    ({"x_pool": np.zeros((0, 4)), "class_names": np.array(["a", "b"]), "kind": np.array("table")}, "x_pool is empty"),
])
def test_bad_site_files_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_site(tmp_path / "bad.npz")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DataFileError, match="write it with `fedal split`"):
        load_site(tmp_path / "nope.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataFileError, match="truncated or not a valid .npz"):
        load_site(tmp_path / "broken.npz")


def test_fedal_split_command(tmp_path, capsys):
    assert cli.main(["split", "--dataset", "digits", "--clients", "1", "--out", str(tmp_path / "s"), "--no-labels"]) == 0
    out = capsys.readouterr().out
    assert "site-0.npz: 1078 pool samples, 269 local test samples, pool labels left out" in out
    assert cli.main(["split", "--dataset", "nope", "--clients", "2", "--out", str(tmp_path / "t")]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
