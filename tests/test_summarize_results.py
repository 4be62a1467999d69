"""The cross-comparison table of simulations.summarize_results."""
import json

import pytest

from fedal.exceptions import ConfigError
from simulations.summarize_results import comparison_row, load_comparison, main

LABELS = [50, 110, 170]


def write_compare(folder, runs, centralized=None):
    folder.mkdir(parents=True)
    payload = {"settings": {"dataset": "bloodmnist", "partition": "dirichlet", "alpha": 0.1},
               "runs": {name: [{"labels": LABELS, "accuracy": acc} for acc in per_seed]
                        for name, per_seed in runs.items()},
               "centralized": None if centralized is None else
               {"name": "centralized-entropy", "runs": [{"labels": LABELS, "accuracy": a} for a in centralized]}}
    (folder / "compare.json").write_text(json.dumps(payload))
    return folder


def test_best_has_the_largest_aulc_gain_and_its_paired_spread_is_reported(tmp_path):
    # "lucky" is far above random on one seed and below it on the other two; "steady" is a
    # little above random on every seed. The mean gain picks "lucky"; the paired spread and
    # the 1/3 seeds above say how little that means.
    runs = {"random": [[0.2, 0.3, 0.4], [0.5, 0.6, 0.7], [0.2, 0.3, 0.4]],
            "lucky": [[0.2, 0.8, 0.9], [0.45, 0.55, 0.65], [0.15, 0.25, 0.35]],
            "steady": [[0.22, 0.32, 0.42], [0.52, 0.62, 0.72], [0.22, 0.32, 0.42]]}
    data = load_comparison(write_compare(tmp_path / "bloodmnist_a01", runs, centralized=[[0.4, 0.6, 0.8]] * 3))
    row = comparison_row(data)
    assert row["comparison"] == "bloodmnist_a01" and row["alpha"] == 0.1 and row["seeds"] == 3
    assert row["best"] == "lucky"
    mean, std, above = row["best_aulc_vs_random"]
    assert mean == pytest.approx((0.375 - 0.05 - 0.05) / 3) and std > 0.15 and above == 1
    assert row["top_saver"] == "lucky"  # its mean curve reaches random's final accuracy earliest
    assert row["centralized_final"] == pytest.approx(0.8)
    assert row["best_gap_to_centralized"] == pytest.approx((0.9 + 0.65 + 0.35) / 3 - 0.8)
    runs.pop("lucky")
    row = comparison_row(load_comparison(write_compare(tmp_path / "steady_only", runs)))
    assert row["best"] == "steady" and row["best_aulc_vs_random"][2] == 3 and row["centralized"] is None


def test_cli_writes_the_table_and_names_bad_inputs(tmp_path, capsys):
    good = write_compare(tmp_path / "a", {"random": [[0.2, 0.3, 0.4]], "entropy": [[0.2, 0.35, 0.5]]})
    out = tmp_path / "summary.md"
    assert main([str(good), "--output", str(out)]) == 0
    text = out.read_text()
    assert "| a | bloodmnist, 0.1 | 1 | 50 -> 170 | 0.400 | entropy | 0.500 |" in text
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "compare.json").write_text("{")
    assert main([str(tmp_path / "bad")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    only_random = write_compare(tmp_path / "r", {"random": [[0.2, 0.3, 0.4]]})
    with pytest.raises(ConfigError, match="only random"):
        comparison_row(load_comparison(only_random))


def test_a_flat_random_curve_shows_no_saving(tmp_path):
    runs = {"random": [[0.5, 0.5, 0.5]], "entropy": [[0.5, 0.6, 0.55]]}
    row = comparison_row(load_comparison(write_compare(tmp_path / "pneumonia", runs)))
    assert row["random_flat"] and row["best"] == "entropy"
    from simulations.summarize_results import markdown
    assert "| n/a (random flat) | n/a (random flat) |" in markdown([row])


def test_against_pairs_each_strategy_with_another_comparisons_random(tmp_path, capsys):
    base = write_compare(tmp_path / "uniform", {"random": [[0.2, 0.3, 0.4], [0.3, 0.4, 0.5]]})
    changed = write_compare(tmp_path / "pool", {"random": [[0.2, 0.4, 0.5], [0.3, 0.45, 0.55]]})
    for folder in (base, changed):  # fedal compare records the seeds it compared
        data = json.loads((folder / "compare.json").read_text())
        (folder / "compare.json").write_text(json.dumps({**data, "seeds": [0, 1]}))
    assert main(["--against", str(base), str(changed)]) == 0
    out = capsys.readouterr().out
    assert "final accuracy 0.4500" in out  # uniform random's mean final accuracy is the target
    # seed 0: AULC 0.375 vs 0.3; seed 1: 0.4375 vs 0.4 -> +5.6 +- 1.9 pt, both above
    assert "| pool | random | 0.525 | +5.6 +- 1.9 pt (2/2) |" in out
    other = write_compare(tmp_path / "other_seeds", {"random": [[0.2, 0.3, 0.4]]})
    data = json.loads((other / "compare.json").read_text())
    (other / "compare.json").write_text(json.dumps({**data, "seeds": [5]}))
    assert main(["--against", str(base), str(other)]) == 2
    assert "same --seeds" in capsys.readouterr().err
