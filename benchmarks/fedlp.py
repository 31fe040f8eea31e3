"""FedLP (Homo p-sweep, Hetero preference flags) against dense FedAvg, IID and Dirichlet(0.5).

``python -m benchmarks.fedlp`` (``make bench``) runs, for each partition scheme (iid, dirichlet
alpha 0.5), dense FedAvg, FedLP-Homo at p = 0.1, 0.3, 0.5, 0.7 and FedLP-Hetero with preference
flags 1, 3, uniform, 5 (18 runs), each with seeds 0, 1 and 2, all with the authors' CNN
(``fedlp-cnn``, flatten size adapted to 28x28x1) and their optimizer (Adam, lr 1e-3), in the
in-process federation (benchmarks/sweep.py, benchmarks/inprocess.py: the real strategies and
ClientApp, no Ray), two runs at a time. Differences and ratios to dense FedAvg are taken against
the FedAvg run of the same seed and scheme, then averaged over seeds.

The setting is small (about 30 minutes per seed on 2 cores): a fixed random subset of
Fashion-MNIST (``--train-size`` training and ``--test-size`` test images, written as IDX files
under the output directory), 40 clients, 10 of them sampled per round (the paper samples 10 of
100), ``--rounds`` rounds of 1 local epoch, client-side evaluation only for Hetero (each client's
own sub-model; the server evaluates the level-5 global model). It also writes, without training,
FedLP's per-level costs for this input shape (shared and private parameters, counted training
FLOPs per example, measured peak memory of one training step), each seed's levels of the
partitions, and the communication model on the paper's CIFAR shape next to the paper's column.
Results: benchmarks/results/fedlp.json and the README table ``fedlp``. ``--quick`` runs a tiny
version (a smoke test of the script itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import sweep

PS = (0.1, 0.3, 0.5, 0.7)
FLAGS = (1, 3, None, 5)  # None: uniform preference, the paper's Hetero(u)
SCHEMES = ("iid", "dirichlet")
TRAINING = ("train", "mask")
"""The purposes whose bytes count as training traffic (rounds.jsonl ``bytes_<direction>_<purpose>``)."""

PAPER_COMM_K = {"fedavg": 1102.93, "homo-0.1": 606.61, "homo-0.3": 716.91, "homo-0.5": 827.20,
                "homo-0.7": 937.49, "hetero-1": 169.60, "hetero-3": 225.28, "hetero-u": 318.66,
                "hetero-5": 710.80}
"""The paper's communication column (k parameters per client and round, CIFAR-10; the authors'
README table, reference/seeds.md 3.3), shown next to our communication model on the same shape."""


def flag_name(flag: int | None) -> str:
    return "u" if flag is None else str(flag)


def plan(rounds: int, nodes: int, fraction: float, data_root: Path, dataset: str) -> list[dict]:
    """Per partition scheme: dense FedAvg, Homo per p, Hetero per flag; the dearest first, so the
    workers finish close together. Every run is compared with the FedAvg run of its scheme."""
    runs = []
    for scheme in SCHEMES:
        runs.append({"scheme": scheme, "method": "fedavg", "key": "fedavg"})
        runs += [{"scheme": scheme, "method": "fedlp-homo", "p": p, "key": f"homo-{p}"} for p in PS]
        runs += [{"scheme": scheme, "method": "fedlp-hetero", "flag": f, "key": f"hetero-{flag_name(f)}"}
                 for f in FLAGS]
    runs.sort(key=lambda r: r["method"] == "fedlp-hetero")
    return [{"name": f"{run['key']}-{run['scheme']}", **run, "dataset": dataset,
             "reference": f"fedavg-{run['scheme']}", "nodes": nodes,
             "config": {"experiment": f"configs/{run['method']}.yaml", "num-server-rounds": rounds,
                        "overrides": overrides(run, data_root, dataset, fraction)}}
            for run in runs]


def overrides(run: dict, data_root: Path, dataset: str, fraction: float) -> str:
    parts = [f"dataset.name={dataset}", f"dataset.root={data_root}", "model.name=fedlp-cnn",
             "client.optimizer=adam", "client.lr=0.001", "client.batch_size=32", "client.local_epochs=1",
             f"sampling.fraction_train={fraction}", f"partition.scheme={run['scheme']}", "partition.alpha=0.5"]
    if run["method"] == "fedlp-hetero":
        parts += ["sampling.fraction_evaluate=1.0", f"fedlp.preferred_level={'null' if run['flag'] is None else run['flag']}"]
    else:
        parts.append("sampling.fraction_evaluate=0")
    if run["method"] == "fedlp-homo":
        parts.append(f"fedlp.p={run['p']}")
    return " ".join(parts)


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, training bytes (train + mask purposes) and parameters per client-round,
    counted FLOPs, client peak memory; Homo's uploaded share, Hetero's levels and validation."""
    dataset = spec["dataset"]
    trained = [r for r in records if r["round"] >= 1]
    client_rounds = sum(r["train_num_nodes"] for r in trained)
    examples = sum(r["train_num_examples"] for r in trained)
    out = {
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "client_rounds": client_rounds,
        "bytes_down_per_client_round": sum(sweep.traffic(r, TRAINING, ("down",)) for r in trained) / client_rounds,
        "bytes_up_per_client_round": sum(sweep.traffic(r, TRAINING, ("up",)) for r in trained) / client_rounds,
        "train_flops_per_round": sum(r["train_flops"] for r in trained) / len(trained),
        "train_flops_per_example": sum(r["train_flops"] for r in trained) / examples,
        "client_peak_memory": max(r["train_peak_memory"] for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
    }
    total = sum(v.numel() for v in _model(dataset, 5).state_dict().values())
    out["counted_params_per_client_round"] = 2.0 * total  # FedAvg: the full model down and up
    if spec["method"] == "fedlp-homo":
        out["uploaded_share"] = sum(r["fedlp_uploaded_share"] * r["train_num_nodes"] for r in trained) / client_rounds
        out["entries_unsent_per_round"] = sum(r["fedlp_entries_unsent"] for r in trained) / len(trained)
        out["counted_params_per_client_round"] = total * (1.0 + out["uploaded_share"])
    if spec["method"] == "fedlp-hetero":
        nodes_by_level: dict[str, int] = {}
        for r in trained:
            for c, n in r["fedlp_nodes_by_level"].items():
                nodes_by_level[c] = nodes_by_level.get(c, 0) + n
        out["client_rounds_by_level"] = nodes_by_level
        shared = {c: sum(v.numel() for k, v in _model(dataset, c).state_dict().items() if not k.startswith("private_"))
                  for c in range(1, 6)}
        out["counted_params_per_client_round"] = sum(
            2.0 * shared[int(c)] * n for c, n in nodes_by_level.items()) / client_rounds
        out["final_val_accuracy"] = records[-1].get("val_accuracy")
        out["final_val_accuracy_by_level"] = records[-1].get("fedlp_val_accuracy_by_level")
    return out


def compare(row: dict, dense: dict) -> dict:
    """Against dense FedAvg of the same seed and scheme: accuracy difference in points, wall-time ratio."""
    return {"acc_minus_dense": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            "wall_ratio": sweep.ratio(row["wall_seconds"], dense["wall_seconds"])}


def _model(dataset: str, level: int):
    from fedprune.data import SPECS
    from fedprune.models import FedLPCNN

    spec = SPECS[dataset]
    return FedLPCNN(spec.channels, spec.num_classes, spec.size, level)


def level_costs(channels: int, size: int, batch_size: int) -> list[dict]:
    """Per level, without training: shared and private parameters, counted training FLOPs per
    example (forward + backward) and the measured peak of one Adam training step."""
    import torch

    from fedprune.fedlp import private_keys, shared_keys
    from fedprune.models import FEDLP_LEVELS, FedLPCNN
    from pruning.accounting import count_flops, training_step_memory

    torch.manual_seed(0)
    rows = []
    for level in FEDLP_LEVELS:
        model = FedLPCNN(channels, 10, size, level)
        params = dict(model.named_parameters())
        x, y = torch.randn(batch_size, channels, size, size), torch.randint(0, 10, (batch_size,))
        memory = training_step_memory(model, torch.nn.functional.cross_entropy, (x, y),
                                      optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3))
        rows.append({
            "level": level,
            "shared_params": sum(params[k].numel() for k in shared_keys(model) if k in params),
            "private_params": sum(params[k].numel() for k in private_keys(model)),
            "train_flops_per_example": count_flops(model, x[:1], training=True).effective,
            "peak_memory": memory.peak,
        })
    return rows


def communication_model() -> dict:
    """Our communication model (parameters per client-round, no buffers) on both input shapes."""
    from fedprune.fedlp import (hetero_params_per_client_round, homo_params_per_client_round,
                                level_shared_params, preference_probs)
    from fedprune.models import FedLPCNN

    out = {}
    for shape, (channels, size) in (("cifar10", (3, 32)), ("fashion-mnist", (1, 28))):
        model = FedLPCNN(channels, 10, size)
        shared = level_shared_params(channels, 10, size)
        rows = {"fedavg": homo_params_per_client_round(model, 1.0)}
        rows.update({f"homo-{p}": homo_params_per_client_round(model, p) for p in PS})
        rows.update({f"hetero-{flag_name(f)}": hetero_params_per_client_round(shared, preference_probs(f))
                     for f in FLAGS})
        out[shape] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = sweep.parser(__doc__, "fedlp", rounds=10, nodes=40)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the clients sampled per round")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    args = sweep.parse(parser, argv)
    if args.quick:
        args.fraction, dataset, data_root = 0.5, "mnist", args.data_root
    else:
        dataset, data_root = "fashion-mnist", sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
    results = sweep.run(plan(args.rounds, args.nodes, args.fraction, data_root, dataset), args, row, compare)
    from fedprune.fedlp import draw_level, preference_probs

    data = (f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images"
            if not args.quick else "tiny MNIST-format files")
    results["setting"].update(
        fraction_train=args.fraction, train_size=args.train_size, test_size=args.test_size, description=(
            f"{data}, {args.nodes} clients (10% of each held out for validation), IID or Dirichlet(0.5), "
            f"{int(args.nodes * args.fraction)} sampled per round, {args.rounds} rounds of 1 local epoch, Adam lr "
            "1e-3, batch 32, the authors' CNN (fedlp-cnn) on 28x28x1, averages weighted by examples, seeds "
            f"{', '.join(map(str, args.seeds))}; in-process federation (real strategies and ClientApp), "
            f"{args.workers} runs at a time."))
    results.update(
        levels_of_partitions={str(seed): {flag_name(f): [draw_level(seed, pid, preference_probs(f))
                                                         for pid in range(args.nodes)] for f in FLAGS}
                              for seed in args.seeds},
        level_costs=level_costs(1, 28, 32), communication_model=communication_model(), paper_comm_k=PAPER_COMM_K)
    return sweep.publish(results, args)


if __name__ == "__main__":
    sys.exit(main())
