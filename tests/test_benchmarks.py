"""The sweep's aggregation and the tables it feeds: mean and std per run, per-seed comparisons."""

import argparse
import json

import pytest
import yaml

from benchmarks import baselines, report, sweep
from fedprune.experiment import experiment_from_run_config


def test_mean_and_sample_std_per_run_and_per_seed_values_kept():
    rows = {("a", seed): {"seed": seed, "acc": acc, "curve": [acc], "tag": "x", "val": None}
            for seed, acc in ((2, 0.9), (0, 0.7), (1, 0.8))}
    [run] = sweep.aggregate([{"name": "a", "method": "m"}], rows)
    assert run["method"] == "m" and [r["seed"] for r in run["per_seed"]] == [0, 1, 2]
    assert run["mean"] == {"acc": pytest.approx(0.8)}  # numeric fields only, seed aside
    assert run["std"] == {"acc": pytest.approx(0.1)}  # sample std, ddof=1
    [single] = sweep.aggregate([{"name": "a"}], {("a", 0): rows["a", 0]})
    assert single["std"] == {}


def test_ratios_are_taken_per_seed_against_the_same_seeds_reference():
    keys = ("final_test_accuracy",) + baselines.RATIOS
    dense = {0: dict.fromkeys(keys, 1.0), 1: dict.fromkeys(keys, 4.0)}
    dense[0]["final_test_accuracy"], dense[1]["final_test_accuracy"] = 0.8, 0.9
    sparse = {0: dict.fromkeys(keys, 0.5), 1: dict.fromkeys(keys, 1.0)}
    sparse[0]["final_test_accuracy"], sparse[1]["final_test_accuracy"] = 0.75, 0.9
    rows = {**{("fedavg", s): {"seed": s, **r} for s, r in dense.items()},
            **{("snip", s): {"seed": s, **r} for s, r in sparse.items()}}
    specs = [{"name": "fedavg", "reference": "fedavg"}, {"name": "snip", "reference": "fedavg"}]
    fedavg, snip = sweep.aggregate(specs, rows, baselines.compare)
    assert snip["mean"]["wall_seconds_ratio"] == pytest.approx((0.5 / 1 + 1 / 4) / 2)  # not 0.75 / 2.5
    assert snip["std"]["wall_seconds_ratio"] == pytest.approx(0.25 * 2 ** 0.5 / 2)
    assert snip["mean"]["acc_minus_dense"] == pytest.approx(-2.5)
    assert fedavg["mean"]["total_bytes_ratio"] == 1.0 and fedavg["std"]["acc_minus_dense"] == 0.0
    rows["fedavg", 0]["wall_seconds"] = 0.0  # no ratio to a zero: absent from mean and std, None per seed
    snip = sweep.aggregate(specs, rows, baselines.compare)[1]
    assert snip["per_seed"][0]["wall_seconds_ratio"] is None and "wall_seconds_ratio" not in snip["mean"]


def test_reuse_takes_finished_runs_of_the_same_experiment_and_rounds_only(tmp_path):
    spec = {"name": "fedavg", "nodes": 3,
            "config": {"experiment": "configs/fedavg.yaml", "num-server-rounds": 1, "overrides": ""}}
    run_dir = tmp_path / "fedavg-s0"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "wall_seconds": 5.0,
                                                      "final_test_accuracy": 0.5}))
    (run_dir / "rounds.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    experiment = experiment_from_run_config({**spec["config"], "seed": 0})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(experiment.to_dict()))

    def row(spec, seed, summary, records):
        return {"final_test_accuracy": summary["final_test_accuracy"], "rounds": len(records)}

    args = argparse.Namespace(only=[], seeds=[0], out=tmp_path, workers=1, reuse=True, command="c", rounds=1,
                              nodes=3)
    results = sweep.run([spec], args, row)  # nothing left to run: no run is made
    assert results["reused_runs"] == 1
    assert results["runs"][0]["per_seed"] == [{"seed": 0, "wall_seconds": 5.0, "final_test_accuracy": 0.5,
                                               "rounds": 2}]
    other_lr = {**spec, "config": {**spec["config"], "overrides": "client.lr=0.5"}}
    more_rounds = {**spec, "config": {**spec["config"], "num-server-rounds": 2}}
    assert sweep.finished(other_lr, 0, tmp_path, row) is None
    assert sweep.finished(more_rounds, 0, tmp_path, row) is None
    assert sweep.finished(spec, 1, tmp_path, row) is None  # another seed: not run yet
    other_batch = {**spec, "config": {**spec["config"], "overrides": "evaluation.batch_size=100"}}
    assert sweep.finished(other_batch, 0, tmp_path, row) is not None  # changes no prediction


def test_reuse_counts_a_key_added_since_the_run_with_its_default(tmp_path):
    spec = {"name": "zo-dense", "nodes": 3,
            "config": {"experiment": "configs/zo-dense.yaml", "num-server-rounds": 1, "overrides": ""}}
    run_dir = tmp_path / "zo-dense-s0"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "wall_seconds": 5.0}))
    (run_dir / "rounds.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    config = experiment_from_run_config({**spec["config"], "seed": 0}).to_dict()
    for key in ("lr_schedule", "lr_decay_steps", "lr_min"):  # as a run made before the schedule existed
        del config["ntk_zo"][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    def row(spec, seed, summary, records):
        return {}

    cosine = {**spec, "config": {**spec["config"],
                                 "overrides": "ntk_zo.lr_schedule=cosine ntk_zo.lr_decay_steps=1"}}
    assert sweep.finished(spec, 0, tmp_path, row) is not None  # the run had the default, constant step
    assert sweep.finished(cosine, 0, tmp_path, row) is None
    config["ntk_zo"]["gone"] = 1  # a key the experiment no longer has: not comparable, rerun
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert sweep.finished(spec, 0, tmp_path, row) is None


def test_only_selects_by_substring_and_keeps_references():
    specs = [{"name": n, "reference": "fedavg"} for n in ("fedavg", "snip-d0.1", "snip-d0.05", "synflow-d0.1")]
    assert [s["name"] for s in sweep.select(specs, ["snip"])] == ["fedavg", "snip-d0.1", "snip-d0.05"]
    with pytest.raises(ValueError):
        sweep.select(specs + specs[:1], [])


def test_tables_render_sweep_results_and_the_committed_files():
    rows = {(s["name"], seed): {"seed": seed, "density": s["target_density"], "final_test_accuracy": 0.8,
                                "bytes_down_per_round": 1e6, "bytes_up_per_round": 1e6, "total_bytes": 4e6,
                                "setup_bytes": 0, "after_cut_bytes": 2e6, "train_flops_per_round": 1e9,
                                "client_peak_memory": 1e7, "wall_seconds": 10.0}
            for s in baselines.plan(6, 10, "") for seed in (0, 1, 2)}
    results = {"command": "c", "setting": {"description": "d."}, "seeds": [0, 1, 2], "total_seconds": 60,
               "runs": sweep.aggregate(baselines.plan(6, 10, ""), rows, baselines.compare)}
    table = report.baselines_table(results)
    assert ("| snip | 0.10 / 0.100 | float32 | 0.8000 +- 0.0000 | +0.00 +- 0.00 | 1.00 | 1.00 | 1.000 +- 0.000 | "
            "1.000 +- 0.000 | 0.00 | 1.0 (1.000 +- 0.000) |") in table
    committed = {name: json.loads((report.RESULTS / file).read_text()) for name, (file, _) in report.TABLES.items()}
    if not report._swept(committed["baselines"]):
        assert report.baselines_table(committed["baselines"]) is None
    assert "| dense FedAvg |" in report.fedlp_table(committed["fedlp"])


def test_a_failing_run_is_reported_with_its_error_and_never_replaces_the_committed_results(tmp_path, capsys,
                                                                                          monkeypatch):
    spec = {"name": "broken", "nodes": 2, "config": {"experiment": "configs/no-such-file.yaml", "num-server-rounds": 1}}
    name, seed, accuracy, result = sweep._execute((spec, 3, str(tmp_path), lambda *a: {}))
    assert (name, seed, accuracy) == ("broken", 3, None)
    assert "no-such-file.yaml" in result["error"] and result["seed"] == 3

    args = argparse.Namespace(quick=False, only=[], out=tmp_path, name="baselines")
    results = {"command": "c", "setting": {}, "seeds": [3], "total_seconds": 1.0, "runs": [],
               "failed_runs": [{"name": name, **result}]}
    committed = (report.RESULTS / "baselines.json").read_bytes()
    monkeypatch.setattr(report, "update_readme", lambda *a: pytest.fail("a failed sweep rewrote the README"))
    assert sweep.publish(results, args) == 1
    assert (report.RESULTS / "baselines.json").read_bytes() == committed
    assert json.loads((tmp_path / "baselines.json").read_text())["failed_runs"][0]["name"] == "broken"
    assert "FAILED: broken seed 3" in capsys.readouterr().err
