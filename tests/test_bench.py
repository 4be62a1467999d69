"""The benchmark scripts' shared helpers: settings parsing and machine-free records."""
from __future__ import annotations

import json

import pytest

from simulations.bench.common import ROOT, SHARED_DATA_DIR, federation_settings, portable


def test_portable_keeps_a_linked_shared_folder_relative(tmp_path):
    # ../shared is often a link (the issue's `make test` failure): following it left an absolute path
    repo, real = tmp_path / "work" / "repo", tmp_path / "elsewhere" / "shared"
    (real / "data").mkdir(parents=True)
    repo.mkdir(parents=True)
    (tmp_path / "work" / "shared").symlink_to(real)
    assert portable({"data": str(tmp_path / "work" / "shared" / "data")}, root=repo) == {"data": "../shared/data"}


def test_portable_writes_paths_beside_the_repository_relative_to_it(tmp_path):
    record = {"data-dir": str(SHARED_DATA_DIR), "out": str(ROOT / "simulations" / "results"),
              "elsewhere": str(tmp_path), "relative": "../shared/data", "rounds": 3}
    out = portable(record)
    assert out["data-dir"] == "../shared/data"
    assert out["out"] == "simulations/results"
    assert out["relative"] == "../shared/data" and out["rounds"] == 3
    # a folder outside the repository's parent is kept as given (it is not ours to rename)
    if not tmp_path.resolve().is_relative_to(ROOT.parent):
        assert out["elsewhere"] == str(tmp_path)
    assert record["data-dir"] == str(SHARED_DATA_DIR)  # the input is not changed


def test_federation_settings_overrides_defaults_and_refuses_a_set_without_equals(tmp_path, capsys):
    settings, out = federation_settings(["--set", "rounds=4", "--output-dir", str(tmp_path)], "bench", {"rounds": 2, "clients": 5})
    assert settings == {"rounds": "4", "clients": 5} and out == str(tmp_path)
    with pytest.raises(SystemExit):
        federation_settings(["--set", "rounds"], "bench", {})
    assert "--set needs KEY=VALUE, got 'rounds'" in capsys.readouterr().err


def test_fl_gap_benchmark_trains_both_ways_on_the_same_labels(tmp_path):
    from simulations.bench.fl_gap import main

    preset = ROOT / "simulations" / "presets" / "digits_tiny.toml"
    results = main(["--preset", str(preset), "--labels-per-client", "20", "--rounds", "2", "--seeds", "0",
                    "--variants", "network (SmallCNN + Adam),head + self-training", "--report-rounds", "1,2",
                    "--out", str(tmp_path)])
    assert results["total_labels"] == [60]  # 3 clients x 20, one seed
    assert set(results["curves"]) == {"network (SmallCNN + Adam)", "network (SmallCNN + Adam) | centralized",
                                      "head + self-training", "head + self-training | centralized"}
    assert all(len(c) == 2 and all(0 <= a <= 1 for a in c) for curves in results["curves"].values() for c in curves)
    # the summed statistics give the pooled head: the same probabilities, the same accuracy
    assert results["max_probability_difference_federated_vs_pooled_head"]["head + self-training-seed0"] < 1e-6
    assert results["curves"]["head + self-training"][0][-1] == results["curves"]["head + self-training | centralized"][0][-1]
    md = (tmp_path / "bench_fl_gap.md").read_text()
    assert "| head + self-training: federated |" in md and "gap to centralized at r=2" in md
    assert json.loads((tmp_path / "bench_fl_gap.json").read_text())["args"]["preset"] == "simulations/presets/digits_tiny.toml"


def test_fl_gap_benchmark_names_its_result_files(tmp_path):
    from simulations.bench.fl_gap import main

    preset = ROOT / "simulations" / "presets" / "digits_tiny.toml"
    main(["--preset", str(preset), "--labels-per-client", "10", "--rounds", "1", "--seeds", "0",
          "--variants", "preset", "--report-rounds", "1", "--out", str(tmp_path), "--name", "bench_fl_gap_digits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_fl_gap_digits.json", "bench_fl_gap_digits.md"]


def test_fl_gap_pooled_only_trains_the_reference_with_the_norm_asked(tmp_path, monkeypatch):
    import fedal.models
    from simulations.bench.fl_gap import main

    norms, build = [], fedal.models.build_model
    monkeypatch.setattr(fedal.models, "build_model", lambda *a, **kw: norms.append(kw["norm"]) or build(*a, **kw))

    preset = ROOT / "simulations" / "presets" / "digits_tiny.toml"
    args = ["--preset", str(preset), "--labels-per-client", "20", "--rounds", "2", "--seeds", "0", "--pooled-only",
            "--variants", "ConvNet GroupNorm + FedAdam (1 step)", "--report-rounds", "2", "--pooled-epochs", "2",
            "--out", str(tmp_path)]
    group = main(args)
    batch = main(args + ["--pooled-norm", "batch", "--name", "batch"])
    name = "ConvNet GroupNorm + FedAdam (1 step)"
    assert set(group["curves"]) == {f"{name} | centralized"}  # no federated run
    assert norms == ["group", "batch"]
    assert 0 <= batch["curves"][f"{name} | centralized"][0][0] <= 1
    assert "(pooled labels, batch norm)" in (tmp_path / "batch.md").read_text()
    assert "(pooled labels)" in (tmp_path / "bench_fl_gap.md").read_text()


@pytest.mark.slow
def test_noise_benchmark_runs_compare_per_oracle_setting(tmp_path):
    from simulations.bench.noise import main, setting_overrides

    assert setting_overrides("mixed-sites", 4, 0.9) == ["client-noise=0,0,0.6,0.6"]
    preset = ROOT / "simulations" / "presets" / "digits_tiny.toml"
    results = main(["--preset", str(preset), "--settings", "clean,uniform-30-review", "--strategies", "random,margin",
                    "--seeds", "0", "--verify-threshold", "0.5", "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path)])
    clean, noisy = (results["settings"][s]["summary"] for s in ("clean", "uniform-30-review"))
    assert set(clean) == set(noisy) == {"random", "margin"}
    # 30% wrong answers cost accuracy; the second readings were asked and counted
    assert noisy["random"]["final_mean"] < clean["random"]["final_mean"]
    assert noisy["random"]["kpi"]["labels_reviewed"] > 0 and not clean["random"]["kpi"]["labels_reviewed"]
    md = (tmp_path / "bench_noise.md").read_text()
    assert "| uniform noise 30% + second readings | random |" in md
    assert (tmp_path / "runs" / "clean" / "compare.json").exists()


@pytest.mark.slow
def test_the_profile_has_every_phase_and_every_client_call(tmp_path):
    from simulations.bench.profile import main

    main(["--preset", "simulations/presets/digits_tiny.toml", "--output-dir", str(tmp_path), "--name", "profile",
          "--top", "500"])
    record = json.loads((tmp_path / "profile.json").read_text())["profile"]
    phases = [t["phase"] for t in record["timeline"]]
    assert len(phases) == 4 and phases[0].startswith("start to Ray up") and "rounds 2-2" in phases[2]
    assert sum(t["seconds"] for t in record["timeline"]) == pytest.approx(record["total_seconds"], abs=0.05)
    calls = {f["function"].split(":")[0] + f["function"][f["function"].index("("):]: f["calls"]
             for f in record["client_top"] if ":" in f["function"]}  # (builtins have no file)
    assert calls["clients/app.py(train)"] == 3 * 2  # 3 clients, 2 rounds: every message any actor handled
    assert calls["clients/app.py(evaluate)"] == 3 * 2
    assert record["server_top"][0]["function"].startswith("server/app.py") and record["final_labels"] == 3 * 10 + 30
    assert "/" + "root" not in (tmp_path / "profile.md").read_text()  # no machine's folders
