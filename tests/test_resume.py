"""Checkpoints and resume: a run killed after a round continues from its checkpoint to the same
final model, bit for bit, as a run that was never interrupted (in process here; over real
`flwr run` in tests/test_simulation.py)."""

import json

import pytest
import torch

from benchmarks.inprocess import run_inprocess
from server_app.results import ResumeError, RunWriter


class Killed(Exception):
    pass


def final_model(run_dir):
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def kill_after_checkpoint(monkeypatch, at_round):
    """Make the run die right after it checkpointed ``at_round`` (as a SIGKILL would)."""
    original = RunWriter.checkpoint

    def checkpoint(self, state):
        original(self, state)
        if state["round"] == at_round:
            raise Killed

    monkeypatch.setattr(RunWriter, "checkpoint", checkpoint)


def whole_and_resumed(run_config, nodes, tmp_path, monkeypatch, at_round):
    """Run ``run_config`` uninterrupted (``tmp_path / "whole"``), then killed after round
    ``at_round`` and resumed (``tmp_path / "killed"``); both final models."""
    run_inprocess(run_config, nodes, tmp_path / "whole")
    with monkeypatch.context() as m:
        kill_after_checkpoint(m, at_round)
        with pytest.raises(Killed):
            run_inprocess(run_config, nodes, tmp_path / "killed")
    run_inprocess({**run_config, "resume": str(tmp_path / "killed")}, nodes, tmp_path / "unused")
    return final_model(tmp_path / "whole"), final_model(tmp_path / "killed")


@pytest.mark.parametrize("experiment, extra", [
    ("configs/fedavg.yaml", ""),
    ("configs/gradual-magnitude.yaml", "pruning.density=0.2 pruning.start_round=1 pruning.end_round=3"),
])
def test_a_killed_run_resumes_to_the_bitwise_same_final_model(tiny_run_config, tmp_path, monkeypatch,
                                                                experiment, extra):
    rc = {**tiny_run_config, "experiment": experiment, "num-server-rounds": 4,
          "overrides": tiny_run_config["overrides"] + " " + extra}
    run_inprocess(rc, 3, tmp_path / "whole")
    with monkeypatch.context() as m:
        kill_after_checkpoint(m, 2)
        with pytest.raises(Killed):
            run_inprocess(rc, 3, tmp_path / "killed")
    assert not (tmp_path / "killed" / "final_model.pt").exists()
    run_inprocess({**rc, "resume": str(tmp_path / "killed")}, 3, tmp_path / "unused")
    whole, resumed = final_model(tmp_path / "whole"), final_model(tmp_path / "killed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    rounds = [json.loads(line)["round"] for line in (tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3, 4]
    density = [json.loads(line)["density"] for line in (tmp_path / "whole" / "rounds.jsonl").read_text().splitlines()]
    again = [json.loads(line)["density"] for line in (tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()]
    assert density == again


def test_resume_refuses_another_experiment_or_a_directory_without_checkpoint(tiny_run_config, tmp_path):
    rc = {**tiny_run_config, "num-server-rounds": 1}
    run_inprocess(rc, 2, tmp_path / "run")
    other = {**rc, "seed": 99, "resume": str(tmp_path / "run")}
    with pytest.raises(ResumeError, match="differs from the run's in seed"):
        run_inprocess(other, 2, tmp_path / "unused")
    with pytest.raises(ResumeError, match="no checkpoint.pt"):
        run_inprocess({**rc, "resume": str(tmp_path)}, 2, tmp_path / "unused")
