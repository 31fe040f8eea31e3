"""The export of a finished run (fedprune/export.py): a dense, an unstructured and a structured run
round-trip through the compact form (and the slim model) to the run's final predictions; sizes;
the check can fail; bad input exits 2 with a message."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from benchmarks.inprocess import run_inprocess
from fedprune.experiment import load_experiment
from fedprune.export import load_compact, main, predict
from fedprune import task
from tests.test_autoflip import FAST
from tests.test_resume import final_model


def finished_run(run_config, tmp_path, experiment="configs/fedavg.yaml", extra="", rounds=2):
    rc = {**run_config, "experiment": experiment, "num-server-rounds": rounds,
          "overrides": f"{run_config['overrides']} {extra}"}
    run_inprocess(rc, 3, tmp_path / "run")
    return tmp_path / "run"


def reference_logits(run_dir):
    """The run's final model (final_model.pt) on the experiment's test set."""
    experiment = load_experiment(run_dir / "config.yaml")
    model = task.new_model(experiment)
    model.load_state_dict(final_model(run_dir))
    x, _ = task.test_data(experiment.dataset.name, experiment.dataset.root)
    return predict(model.eval(), x, 1000), x


@pytest.mark.parametrize("experiment, extra, pruned, slim", [
    ("configs/fedavg.yaml", "", False, False),
    ("configs/random.yaml", "pruning.density=0.1", True, False),
    ("configs/autoflip.yaml", f"{FAST} autoflip.structured_quantile=0.2", True, True),
])
def test_the_exported_forms_give_the_final_models_predictions_in_fewer_bytes(tiny_run_config, tmp_path, experiment,
                                                                             extra, pruned, slim):
    run_dir = finished_run(tiny_run_config, tmp_path, experiment, extra)
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    files, check = report["files"], report["check"]
    assert check["passed"] and check["compact"] == {"agreement": 1.0, "max_logit_diff": 0.0, "identical_state": True}
    assert files["dense"]["bytes"] == (tmp_path / "out" / "dense.pt").stat().st_size

    model, masks = load_compact(tmp_path / "out" / "model.fpc")
    final, final_masks = final_model(run_dir), torch.load(run_dir / "final_masks.pt", weights_only=True)
    assert model.state_dict().keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert masks.keys() == final_masks.keys() and all(torch.equal(m, final_masks[k]) for k, m in masks.items())
    reference, x = reference_logits(run_dir)
    assert torch.equal(predict(model, x, 1000), reference)

    compact = files["compact"]["bytes"] / files["dense"]["bytes"]
    assert bool(masks) == pruned
    assert compact < min(1.0, report["density"] + 1 / 32 + 0.01)  # kept values, at most a bit per position
    assert ("slim" in files) == slim == ("slim" in check)
    if slim:
        program = torch.export.load(tmp_path / "out" / "slim.pt2").module()
        assert files["slim"]["parameters"] < 0.7 * report["parameters"]
        assert [k < u for k, u in zip(files["slim"]["units_kept"], files["slim"]["units"])] == [True, True, True, False]
        assert check["slim"]["agreement"] == 1.0 and check["slim"]["max_logit_diff"] < 1e-4
        assert torch.equal(predict(program, x, 1).argmax(1), reference.argmax(1))  # batch 1, as on a device


def test_a_form_that_predicts_otherwise_fails_the_check(tiny_run_config, tmp_path, monkeypatch, capsys):
    run_dir = finished_run(tiny_run_config, tmp_path, rounds=1)
    reference, _ = reference_logits(run_dir)
    wrong = int(reference.argmax(1)[0] + 1) % 10

    def always_wrong(path):
        model, masks = load_compact(path)
        with torch.no_grad():
            model.classifier[-1].weight.zero_()
            model.classifier[-1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(wrong), 10))
        return model, masks

    monkeypatch.setattr("fedprune.export.load_compact", always_wrong)
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert not json.loads((tmp_path / "out" / "export.json").read_text())["check"]["passed"]


def break_run(run_dir, case):
    if case == "no summary.json":
        (run_dir / "summary.json").unlink()
    elif case == "a failed run":
        (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": "too few nodes"}))
    elif case == "no final_model.pt":
        (run_dir / "final_model.pt").unlink()
    elif case == "an unknown method":
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "method": "nonesuch"}))
    elif case == "no final mask":
        (run_dir / "final_masks.pt").unlink()
        (run_dir / "checkpoint.pt").unlink()


BAD_INPUT = {
    "no such directory": "no such directory",
    "not a run directory": "is not a run directory: no config.yaml",
    "no summary.json": "the run has not finished (no summary.json",
    "a failed run": "did not complete (status 'failed': too few nodes)",
    "no final_model.pt": "no final_model.pt",
    "an unknown method": "method: got 'nonesuch'; allowed: fedavg",
    "no final mask": "the final mask is unknown: no final_masks.pt and no checkpoint.pt",
}


def test_bad_input_exits_2_with_a_message_that_names_what_is_wrong(tiny_run_config, tmp_path, capsys):
    run_dir = finished_run(tiny_run_config, tmp_path, rounds=1)
    for case, message in BAD_INPUT.items():
        broken = tmp_path / case.replace(" ", "-")
        if case == "not a run directory":
            broken.mkdir()
        elif case != "no such directory":
            shutil.copytree(run_dir, broken)
            break_run(broken, case)
        assert main([str(broken)]) == 2, case
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (case, err)
    # a run written before final_masks.pt existed: its final mask is in the last round's checkpoint
    (run_dir / "final_masks.pt").unlink()
    assert main([str(run_dir)]) == 0


def test_the_loader_needs_only_torch_numpy_the_codec_and_the_models():
    code = ("import sys, fedprune.export; heavy = {'yaml', 'flwr', 'flwr_datasets', 'fedprune.task'} & set(sys.modules);"
            " assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
