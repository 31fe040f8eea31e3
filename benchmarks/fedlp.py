"""FedLP (Homo p-sweep, Hetero preference flags) against dense FedAvg, IID and Dirichlet(0.5).

``python -m benchmarks.fedlp`` (``make bench``) runs, for each partition scheme (iid, dirichlet
alpha 0.5), dense FedAvg, FedLP-Homo at p = 0.1, 0.3, 0.5, 0.7 and FedLP-Hetero with preference
flags 1, 3, uniform, 5 (18 runs), all with the authors' CNN (``fedlp-cnn``, flatten size adapted
to 28x28x1) and their optimizer (Adam, lr 1e-3), in the in-process federation
(benchmarks/inprocess.py: the real strategies and ClientApp, no Ray), two runs at a time.

To fit about 30 minutes on 2 cores the setting is small: a fixed random subset of Fashion-MNIST
(``--train-size`` training and ``--test-size`` test images, written as IDX files under the output
directory), 40 clients, 10 of them sampled per round (the paper samples 10 of 100), ``--rounds``
rounds of 1 local epoch,
client-side evaluation only for Hetero (each client's own sub-model; the server evaluates the
level-5 global model). It also writes, without training, FedLP's per-level costs for this input
shape (shared and private parameters, counted training FLOPs per example, measured peak memory of
one training step) and the communication model on the paper's CIFAR shape next to the paper's
column. Results: benchmarks/results/fedlp.json and the README table ``fedlp``.
``--quick`` runs a tiny version (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import struct
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import report

RESULTS = report.RESULTS / "fedlp.json"
PS = (0.1, 0.3, 0.5, 0.7)
FLAGS = (1, 3, None, 5)  # None: uniform preference, the paper's Hetero(u)
SCHEMES = ("iid", "dirichlet")

PAPER_COMM_K = {"fedavg": 1102.93, "homo-0.1": 606.61, "homo-0.3": 716.91, "homo-0.5": 827.20,
                "homo-0.7": 937.49, "hetero-1": 169.60, "hetero-3": 225.28, "hetero-u": 318.66,
                "hetero-5": 710.80}
"""The paper's communication column (k parameters per client and round, CIFAR-10; the authors'
README table, reference/seeds.md 3.3), shown next to our communication model on the same shape."""


def flag_name(flag: int | None) -> str:
    return "u" if flag is None else str(flag)


def plan() -> list[dict]:
    runs = []
    for scheme in SCHEMES:
        runs.append({"scheme": scheme, "method": "fedavg", "key": "fedavg"})
        runs += [{"scheme": scheme, "method": "fedlp-homo", "p": p, "key": f"homo-{p}"} for p in PS]
        runs += [{"scheme": scheme, "method": "fedlp-hetero", "flag": f, "key": f"hetero-{flag_name(f)}"}
                 for f in FLAGS]
    for run in runs:
        run["name"] = f"{run['key']}-{run['scheme']}"
    return runs


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_subset(directory: Path, train_size: int, test_size: int) -> Path:
    """A fixed random subset of Fashion-MNIST as IDX files (seeded; the same on every machine)."""
    from fedprune.data import load_dataset
    from fedprune.seeding import numpy_rng

    splits = load_dataset("fashion-mnist")
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, x, y, n in (("train", splits.train_x, splits.train_y, train_size),
                            ("t10k", splits.test_x, splits.test_y, test_size)):
        idx = np.sort(numpy_rng(0, "fedlp-bench-subset", prefix).choice(len(y), size=min(n, len(y)), replace=False))
        write_idx(directory / f"{prefix}-images-idx3-ubyte", x.numpy()[idx, 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", y.numpy()[idx])
    return directory


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


def execute(args: tuple[dict, int, int, float, str, str, str]) -> dict:
    run, rounds, nodes, fraction, data_root, dataset, out_dir = args
    import torch

    from benchmarks.inprocess import run_inprocess

    torch.set_num_threads(1)
    experiment = {"fedavg": "configs/fedavg.yaml", "fedlp-homo": "configs/fedlp-homo.yaml",
                  "fedlp-hetero": "configs/fedlp-hetero.yaml"}[run["method"]]
    start = time.monotonic()
    run_dir = Path(out_dir) / run["name"]
    summary = run_inprocess({"experiment": experiment, "num-server-rounds": rounds, "seed": 42,
                             "overrides": overrides(run, Path(data_root), dataset, fraction)}, nodes, run_dir)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["round"] >= 1]
    client_rounds = sum(r["train_num_nodes"] for r in trained)
    examples = sum(r["train_num_examples"] for r in trained)
    row = {
        **{k: v for k, v in run.items()},
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "client_rounds": client_rounds,
        "bytes_down_per_client_round": sum(r["bytes_down"] for r in trained) / client_rounds,
        "bytes_up_per_client_round": sum(r["bytes_up"] for r in trained) / client_rounds,
        "train_flops_per_round": sum(r["train_flops"] for r in trained) / len(trained),
        "train_flops_per_example": sum(r["train_flops"] for r in trained) / examples,
        "client_peak_memory": max(r["train_peak_memory"] for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
        "wall_seconds": wall,
    }
    total = sum(v.numel() for v in _model(dataset, 5).state_dict().values())
    row["counted_params_per_client_round"] = 2.0 * total  # FedAvg: the full model down and up
    if run["method"] == "fedlp-homo":
        row["uploaded_share"] = sum(r["fedlp_uploaded_share"] * r["train_num_nodes"] for r in trained) / client_rounds
        row["entries_unsent_per_round"] = sum(r["fedlp_entries_unsent"] for r in trained) / len(trained)
        row["counted_params_per_client_round"] = total * (1.0 + row["uploaded_share"])
    if run["method"] == "fedlp-hetero":
        nodes_by_level: dict[str, int] = {}
        for r in trained:
            for c, n in r["fedlp_nodes_by_level"].items():
                nodes_by_level[c] = nodes_by_level.get(c, 0) + n
        row["client_rounds_by_level"] = nodes_by_level
        shared = {c: sum(v.numel() for k, v in _model(dataset, c).state_dict().items() if not k.startswith("private_"))
                  for c in range(1, 6)}
        row["counted_params_per_client_round"] = sum(
            2.0 * shared[int(c)] * n for c, n in nodes_by_level.items()) / client_rounds
        row["final_val_accuracy"] = records[-1].get("val_accuracy")
        row["final_val_accuracy_by_level"] = records[-1].get("fedlp_val_accuracy_by_level")
    return row


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the clients sampled per round")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated run names (e.g. fedavg-iid,homo-0.1-iid)")
    parser.add_argument("--out", default=str(report.ROOT / "outputs" / "bench-fedlp"))
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 rounds: checks the script")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.quick:
        from tests.conftest import write_mnist

        data_root, dataset = write_mnist(Path("/tmp/fedprune-quick-mnist")), "mnist"
        args.rounds, args.nodes, args.fraction = 2, 3, 0.5
    else:
        data_root, dataset = write_subset(out / "data", args.train_size, args.test_size), "fashion-mnist"
    runs = plan()
    if args.only:
        runs = [r for r in runs if r["name"] in args.only.split(",")]
    # the dearest runs first, so the two workers finish close together
    runs.sort(key=lambda r: r["method"] == "fedlp-hetero")
    started = time.monotonic()
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        jobs = [(r, args.rounds, args.nodes, args.fraction, str(data_root), dataset, str(out)) for r in runs]
        for row in pool.imap_unordered(execute, jobs):
            rows.append(row)
            print(f"{row['name']:<22} acc {row['final_test_accuracy']:.4f}  "
                  f"{(row['bytes_down_per_client_round'] + row['bytes_up_per_client_round']) / 4e3:8.1f} k params/client-round  "
                  f"{row['wall_seconds']:.0f} s", flush=True)
    order = {r["name"]: i for i, r in enumerate(plan())}
    rows.sort(key=lambda r: order[r["name"]])
    from fedprune.fedlp import draw_level, preference_probs

    results = {
        "command": "make bench (python -m benchmarks.fedlp)" + (" --quick" if args.quick else ""),
        "setting": {
            "rounds": args.rounds, "nodes": args.nodes, "fraction_train": args.fraction, "seed": 42, "workers": args.workers,
            "train_size": args.train_size, "test_size": args.test_size,
            "description": (
                f"{'tiny MNIST-format files' if args.quick else f'Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images'}, "
                f"{args.nodes} clients (10% of each held out for validation), IID or Dirichlet(0.5), "
                f"{int(args.nodes * args.fraction)} sampled per round, {args.rounds} rounds of 1 local epoch, Adam lr 1e-3, batch 32, the authors' "
                "CNN (fedlp-cnn) on 28x28x1, averages weighted by examples, seed 42; in-process federation "
                f"(real strategies and ClientApp), {args.workers} runs at a time."),
        },
        "levels_of_partitions": {flag_name(f): [draw_level(42, pid, preference_probs(f)) for pid in range(args.nodes)]
                                 for f in FLAGS},
        "level_costs": level_costs(1, 28, 32),
        "communication_model": communication_model(),
        "paper_comm_k": PAPER_COMM_K,
        "total_seconds": time.monotonic() - started,
        "runs": rows,
    }
    if args.quick or args.only:  # a partial sweep: results and the table go to the output directory
        (out / "fedlp.json").write_text(json.dumps(results, indent=1) + "\n")
        if not args.only:
            print(report.fedlp_table(results))
        print(f"wrote {out / 'fedlp.json'}")
        return 0
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report.update_readme(["fedlp"])
    print(f"wrote {RESULTS} and the README table in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
