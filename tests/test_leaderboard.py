"""The leaderboard: every method with its dense FedAvg twin, rows and per-seed ratios, the table, the plots."""

import argparse
import json
import logging
from dataclasses import asdict

import matplotlib.image
import pytest

from benchmarks import leaderboard, plots, sweep
from benchmarks.inprocess import run_inprocess
from fedprune.experiment import experiment_from_run_config
from fedprune.methods import METHODS


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"rounds": 4, "nodes": 20, "zo_rounds": 10, "densities": [0.1, 0.3],
                                 "explore_epochs": 1, **kw})


def test_every_registered_method_is_on_the_leaderboard():
    assert {e.method for e in leaderboard.ENTRIES} | {"fedavg"} == set(METHODS)


def test_each_run_is_compared_with_dense_fedavg_of_its_model_and_client_on_its_split():
    specs = leaderboard.plan(args(), leaderboard.federation("/data"))
    by_name = {s["name"]: s for s in specs}
    experiments = {s["name"]: experiment_from_run_config({**s["config"], "seed": 0}) for s in specs}
    for s in specs:
        run, ref = experiments[s["name"]], experiments[s["reference"]]
        assert ref.method == "fedavg" and by_name[s["reference"]]["partition"] == s["partition"]
        assert run.partition == ref.partition and run.dataset == ref.dataset and run.sampling == ref.sampling
        if s["method"] in ("ntk-zo", "zo-dense"):
            assert s["reference"] == f"fedavg-{s['partition']}" and run.num_server_rounds == 10
        else:
            assert run.client == ref.client and run.num_server_rounds == ref.num_server_rounds == 4
            assert ref.model.name == {"gated-cnn": "cnn-bn"}.get(run.model.name, run.model.name)
    assert experiments["fedavg-cnn-bn-adam-dirichlet"].client.optimizer == "adam"  # FedTiny's client
    assert by_name["fedtiny-d0.3-dirichlet"]["reference"] == "fedavg-cnn-bn-adam-dirichlet"
    assert by_name["feddp-pathological"]["reference"] == "fedavg-cnn-bn-sgd-pathological"
    assert by_name["fedlp-hetero-dirichlet"]["reference"] == "fedavg-fedlp-cnn-adam-dirichlet"
    masked = [s for s in specs if s["method"] != "fedavg" and METHODS[s["method"]].masked]
    assert {(s["method"], experiments[s["name"]].pruning.density) for s in masked} == {
        (e.method, d) for e in leaderboard.ENTRIES if e.masked for d in (0.1, 0.3)}
    assert by_name["feddp-dirichlet"]["knob"] == "r = 0.7, scaffold"  # its config's default
    assert sum(s["method"] == "fedavg" for s in specs) == 2 * 4  # 4 distinct (model, client) twins per split


def fake_records(flops: float, peak: float, explore: float = 0.0) -> list[dict]:
    common = {"rejected_replies": 0, "failed_replies": 0, "density": 0.5}
    return [{"round": 0, "test_accuracy": 0.1, "bytes_down": 10, "bytes_up": 0, "autoflip_explore_flops": explore,
             **common},
            *({"round": t, "test_accuracy": 0.1 + 0.2 * t, "bytes_down": 100, "bytes_up": 50, "train_flops": flops,
               "train_peak_memory": peak * t, **common} for t in (1, 2))]


def test_rows_keep_per_round_curves_and_ratios_are_per_seed():
    row = leaderboard.row({}, 0, {"final_test_accuracy": 0.5, "best_test_accuracy": 0.5}, fake_records(3.0, 2.0, 1.0))
    assert row["cumulative_bytes_by_round"] == [10, 160, 310] and row["bytes_up"] == 100
    assert row["cumulative_flops_by_round"] == [1.0, 4.0, 7.0] and row["train_flops"] == 7.0  # exploration counted
    assert row["client_peak_memory"] == 4.0 and row["accuracy_by_round"] == pytest.approx([0.1, 0.3, 0.5])
    rows = {}
    for seed, (acc, flops, share) in enumerate(((0.5, 1.0, 0.5), (0.7, 4.0, 0.25))):
        summary = {"final_test_accuracy": acc, "best_test_accuracy": acc}
        dense = leaderboard.row({}, seed, summary, fake_records(flops, 2))
        sparse = leaderboard.row({}, seed, {**summary, "final_test_accuracy": acc - 0.1},
                                 fake_records(flops * share, 1))
        rows["fedavg-x", seed] = {"seed": seed, "wall_seconds": 10.0, **dense}
        rows["snip-x", seed] = {"seed": seed, "wall_seconds": 5.0, **sparse}
    specs = [{"name": "fedavg-x", "reference": "fedavg-x"}, {"name": "snip-x", "reference": "fedavg-x"}]
    _, snip = sweep.aggregate(specs, rows, leaderboard.compare)
    assert snip["mean"]["train_flops_ratio"] == pytest.approx((0.5 + 0.25) / 2)  # per seed, then the mean
    assert snip["mean"]["acc_minus_dense"] == pytest.approx(-10.0) and snip["mean"]["wall_seconds_ratio"] == 0.5
    assert snip["mean"]["client_peak_memory_ratio"] == 0.5 and "cumulative_bytes_by_round" not in snip["mean"]


def test_pareto_front_keeps_the_runs_nothing_beats_on_both_memory_and_accuracy():
    points = [(10.0, 0.8), (5.0, 0.7), (5.0, 0.6), (20.0, 0.8), (2.0, 0.3), (30.0, 0.9)]
    assert plots.pareto_front(points) == [4, 1, 0, 5]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, tiny_mnist) -> dict:
    """Dense FedAvg and the random mask, 2 rounds, 2 seeds, the Dirichlet split, on the tiny MNIST files."""
    out = tmp_path_factory.mktemp("leaderboard")
    common = f"dataset.name=mnist dataset.root={tiny_mnist} client.batch_size=16 sampling.fraction_evaluate=0"
    specs = [s for s in leaderboard.plan(args(rounds=2, nodes=4, densities=[0.1]), common)
             if s["name"] in ("fedavg-dirichlet", "random-d0.1-dirichlet")]
    rows = {}
    for s in specs:
        for seed in (0, 1):
            run_dir = out / f"{s['name']}-s{seed}"
            summary = run_inprocess({**s["config"], "seed": seed}, s["nodes"], run_dir)
            records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
            rows[s["name"], seed] = {"seed": seed, "wall_seconds": summary["wall_seconds"],
                                     **leaderboard.row(s, seed, summary, records)}
    return {"command": "test", "setting": {"description": "tiny.", "quick": True}, "seeds": [0, 1],
            "total_seconds": 1.0, "runs": sweep.aggregate(specs, rows, leaderboard.compare)}


def test_a_tiny_leaderboard_renders_its_table(tiny_results):
    runs = {r["name"]: r for r in tiny_results["runs"]}
    random = runs["random-d0.1-dirichlet"]
    assert [len(s["cumulative_flops_by_round"]) for s in random["per_seed"]] == [3, 3]
    assert 0 < random["mean"]["train_flops_ratio"] < 1 and 0 < random["mean"]["bytes_up_ratio"] < 1
    table = leaderboard.table(tiny_results)
    assert "| dirichlet | random mask | cnn | 0.1 (0.100) | 2 |" in table and "| fedavg-dirichlet |" in table
    assert table.count("\n| dirichlet |") == 2 and "Setting: tiny. Mean +- sample std" in table


def test_plots_regenerate_as_png_files_matplotlib_reads(tiny_results, tmp_path):
    written = plots.render(tiny_results, tmp_path)
    assert [p.name for p in written] == list(plots.FIGURES)
    for path in written:
        image = matplotlib.image.imread(path)
        assert path.stat().st_size > 10_000 and image.shape[0] > 300 and image.shape[1] > 600
    assert plots.main([str(_write(tiny_results, tmp_path / "lb.json")), "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(plots.FIGURES)


def _write(results: dict, path):
    sweep.write_json(path, results)
    return path


def test_reference_twin_uses_the_methods_whole_client_config():
    model, client = leaderboard.reference_of(next(e for e in leaderboard.ENTRIES if e.method == "feddp"))
    assert model == "cnn-bn" and client == asdict(leaderboard.config("feddp").client)


def test_each_rounds_console_line_shows_a_progress_bar_and_an_eta(tmp_path, caplog):
    from server_app.results import RunWriter

    writer = RunWriter(tmp_path, experiment_from_run_config({"experiment": "configs/fedavg.yaml",
                                                             "num-server-rounds": 4}))
    with caplog.at_level(logging.INFO):
        for t, seconds in ((0, 5.0), (1, 2.0), (2, 4.0)):
            writer.record_round({"round": t, "bytes_down": 0, "bytes_up": 0, "round_seconds": seconds,
                                 "wall_seconds": 11.0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert lines[0].startswith("round 0/4 [                    ]") and lines[0].endswith("ETA ?")
    assert lines[1].startswith("round 1/4 [#####               ]") and lines[1].endswith("ETA 6 s")  # 3 x 2 s
    assert lines[2].startswith("round 2/4 [##########          ]") and lines[2].endswith("ETA 6 s")  # 2 x 3 s
