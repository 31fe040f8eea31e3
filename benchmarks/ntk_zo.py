"""Foresight pruning meets zeroth-order training: masked ZO (ntk-zo) against dense ZO (zo-dense) and
backprop FedAvg, Fashion-MNIST Dirichlet 0.5 and 0.1; the federated masks against the pooled-data
mask; client memory; upload bytes against K.

``python -m benchmarks.ntk_zo`` (``make bench``) runs, per Dirichlet alpha (0.5, 0.1), dense ZO,
masked ZO (data-free federated NTK-SAP mask, density 0.1) and backprop FedAvg (fewer rounds: a
reference, not a race) with seeds 0, 1, 2 in the in-process federation (benchmarks/sweep.py: the
real strategies and ClientApp), two runs at a time. Both ZO methods take a step that decays to 0 over
the run by a half cosine (``--lr-schedule``; benchmarks/zo_lr.py measured it better than a constant
step for each). Masked ZO is compared with the dense ZO run of
the same seed and alpha: accuracy gain in points and the ratio of counted training FLOPs.

Then, without training, in this process:

* **masks** (``--mask-seeds``, Dirichlet 0.1 and 0.5): the federated data-free mask and the
  federated data-driven masks (NTK-SAP on local batches; SNIP, each client's own |g*w| averaged),
  all from the real strategy and ClientApp, against the mask computed on pooled data (the union of
  the clients' training splits: NTK-SAP on real inputs, the same schedule and number of draws;
  and SNIP on the union of the same number of batches), as IoU of the kept positions; plus each
  criterion redrawn with another seed (how much two masks of the same kind differ by chance);
* **memory**: the measured peak of one training step of a backprop client (SGD with momentum, as
  the FedAvg clients) and of a ZO client (dense; masked on the dense weights; masked on the kept
  weights only, as the runs' clients), whole-batch or micro-batched forwards, at several batch
  sizes, on the small CNN;
* **upload**: the bytes of one training reply (the real client routine, measured as the ledger
  measures) for several K.

The setting is small enough for 2 shared cores: a fixed random subset of Fashion-MNIST (20000
training and 1000 test images), 10 clients, 3 sampled per round. ``--quick`` runs a tiny version
(a smoke test of the script itself).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import report, sweep

ALPHAS = (0.5, 0.1)
TRAINING = ("train", "mask")
"""Purposes whose bytes count as training traffic (the mask travels with the first model)."""
MEMORY_BATCHES = (16, 32, 64, 128)
MEMORY_CHUNKS = (0, 4)
MEMORY_VARIANTS = ("dense", "masked", "sparse")
"""ZO without a mask; with the mask on the dense weights; on the kept weights only (ntk_zo.sparse_weights)."""
UPLOAD_KS = (5, 20, 50, 100)


def zo_overrides(args) -> str:
    """The ZO keys every ZO run shares; a cosine step decays to 0 over the run's steps (rounds x local steps)."""
    schedule = f"ntk_zo.lr_schedule={args.lr_schedule}"
    if args.lr_schedule == "cosine":
        schedule += f" ntk_zo.lr_decay_steps={args.rounds * args.local_steps}"
    return (f"ntk_zo.num_perturbations={args.k} ntk_zo.local_steps={args.local_steps} ntk_zo.clip={args.clip} "
            f"ntk_zo.forward_chunk={args.chunk} sampling.fraction_evaluate=0 sampling.fraction_train={args.fraction} "
            f"sampling.min_train_nodes=1 client.batch_size={args.batch_size} {schedule}")


def plan(args, data_root: Path, dataset: str) -> list[dict]:
    """Per alpha: dense ZO (the reference), masked ZO and backprop FedAvg, the dearest first."""
    scheme = "iid" if args.quick else "dirichlet"
    common = f"dataset.name={dataset} dataset.root={data_root} partition.scheme={scheme}"
    specs = []
    for alpha in ALPHAS:
        base = f"{common} partition.alpha={alpha}"
        runs = {
            "zo-dense": (args.rounds, f"{base} {zo_overrides(args)} ntk_zo.lr={args.lr_dense}"),
            "ntk-zo": (args.rounds, f"{base} {zo_overrides(args)} ntk_zo.lr={args.lr_masked} "
                                    f"pruning.density={args.density}"),
            "fedavg": (args.fedavg_rounds, f"{base} sampling.fraction_evaluate=0 sampling.min_train_nodes=1 "
                                           f"sampling.fraction_train={args.fraction} "
                                           f"client.batch_size={args.batch_size}"),
        }
        for method, (rounds, overrides) in runs.items():
            specs.append({"name": f"{method}-a{alpha}", "method": method, "alpha": alpha, "nodes": args.nodes,
                          "reference": f"zo-dense-a{alpha}" if method == "ntk-zo" else None,
                          "config": {"experiment": f"configs/{method}.yaml", "num-server-rounds": rounds,
                                     "overrides": overrides}})
    return specs


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, counted training FLOPs, training bytes per client and round (down, up),
    the client's measured peak memory, setup (mask) bytes."""
    trained = [r for r in records if r["round"] >= 1]
    client_rounds = sum(r.get("train_num_nodes", 0) for r in trained)
    steady = [r for r in trained[1:] if r.get("train_num_nodes")]
    return {
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "density": records[-1]["density"],
        "train_flops": sum(r.get("train_flops", 0) for r in trained),
        "train_flops_per_client_round": sum(r.get("train_flops", 0) for r in trained) / client_rounds,
        "client_peak_memory": max(r.get("train_peak_memory", 0) for r in trained),
        "bytes_down_per_client_round": sum(sweep.traffic(r, TRAINING, ("down",)) for r in trained) / client_rounds,
        "bytes_up_per_client_round": sum(sweep.traffic(r, TRAINING, ("up",)) for r in trained) / client_rounds,
        "bytes_up_per_client_round_after_round_1": (sum(sweep.traffic(r, TRAINING, ("up",)) for r in steady)
                                                    / max(1, sum(r["train_num_nodes"] for r in steady))),
        "setup_bytes": records[0]["bytes_down"] + records[0]["bytes_up"],
        "models_sent": sum(r.get("zo_models_sent", 0) for r in trained),
        "replays_sent": sum(r.get("zo_replays_sent", 0) for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
    }


def compare(row: dict, dense: dict) -> dict:
    """Masked ZO against dense ZO of the same seed and alpha."""
    return {"acc_gain_points": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            "best_acc_gain_points": 100 * (row["best_test_accuracy"] - dense["best_test_accuracy"]),
            "flops_ratio": sweep.ratio(row["train_flops"], dense["train_flops"])}


# ---------------------------------------------------------------------------------------------- masks

def iou(a: dict, b: dict) -> float:
    """Intersection over union of the kept positions of two masks (all layers together)."""
    inter = sum(int(np.logical_and(a[k], b[k]).sum()) for k in a)
    union = sum(int(np.logical_or(a[k], b[k]).sum()) for k in a)
    return inter / union


def allocation_gap(a: dict, b: dict) -> float:
    """Share of the kept weights the two masks place in different layers:
    ``sum_l |kept_a(l) - kept_b(l)| / (2 * kept)``; 0 when the per-layer counts agree."""
    return sum(abs(int(a[k].sum()) - int(b[k].sum())) for k in a) / (2 * sum(int(m.sum()) for m in a.values()))


def federated_mask(run_config: dict, nodes: int) -> dict[str, np.ndarray]:
    """The mask the real strategy and ClientApp choose before round 1 (in process)."""
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.inprocess import InProcessGrid
    from fedprune.experiment import experiment_from_run_config
    from fedprune.task import new_model
    from strategies import build_strategy
    from strategies.ledger import MeteredGrid

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as run_inprocess does
    experiment = experiment_from_run_config(run_config)
    strategy = build_strategy(experiment)
    strategy.global_arrays = {k: v.numpy() for k, v in new_model(experiment).state_dict().items()}
    strategy.prepare(MeteredGrid(InProcessGrid(run_config, nodes)))
    return strategy.masks


def pooled_data(experiment, nodes: int):
    """The union of the clients' training splits."""
    import torch

    from fedprune.task import client_data

    parts = [client_data(experiment.dataset, experiment.partition, i, nodes) for i in range(nodes)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pooled_masks(experiment, x, y, nodes: int, seed_tag: str) -> dict[str, dict[str, np.ndarray]]:
    """Masks on pooled data ``x, y`` (what no federation can compute): NTK-SAP on real inputs with
    the federation's schedule and number of draws, and SNIP on the union of as many batches as the
    federation's SNIP phase scores."""
    import torch

    from fedprune.seeding import torch_generator
    from fedprune.task import maskable_names, new_model
    from pruning.ntk import iterative_masks, ntk_scores
    from pruning.scores import snip_scores
    from strategies.baselines import selector

    cfg, p = experiment.ntk_zo, experiment.pruning
    model = new_model(experiment)
    names = maskable_names(experiment, model)
    select = selector(p.allocation)

    def score(masks, j):
        g = torch_generator(experiment.seed, seed_tag, j)
        order = torch.randperm(len(x), generator=g)[: nodes * cfg.draws * cfg.score_batch_size]
        inputs = list(x[order].split(cfg.score_batch_size))
        return ntk_scores(model, names, inputs, masks, epsilon=cfg.epsilon, generator=g,
                          resample_weights=cfg.resample_weights)

    ntk = iterative_masks({n: model.get_parameter(n).shape for n in names}, p.density, cfg.prune_iterations, score,
                          select)
    g = torch_generator(experiment.seed, seed_tag, "snip")
    order = torch.randperm(len(x), generator=g)[: nodes * p.score_batches * experiment.client.batch_size]
    union = [(x[i], y[i]) for i in order.split(experiment.client.batch_size)]
    snip = select(snip_scores(model, torch.nn.functional.cross_entropy, union, names), p.density)
    return {"ntk": {k: v.numpy() for k, v in ntk.items()}, "snip": {k: v.numpy() for k, v in snip.items()}}


def random_mask(experiment, seed: int) -> dict[str, np.ndarray]:
    """A random mask at the experiment's density and allocation (the ``random`` baseline's rule)."""
    from fedprune.seeding import torch_generator
    from fedprune.task import maskable_names, new_model
    from pruning.scores import random_scores
    from strategies.baselines import selector

    model = new_model(experiment)
    scores = random_scores(model, maskable_names(experiment, model), torch_generator(seed, "random-mask"))
    masks = selector(experiment.pruning.allocation)(scores, experiment.pruning.density)
    return {k: v.numpy() for k, v in masks.items()}


def gradient_share(experiment, x, y, masks: dict[str, np.ndarray]) -> float:
    """Share of the squared loss gradient (initial model, batch ``x, y``) on the masked parameters
    that the mask keeps: how much of the gradient a ZO direction restricted to the mask can see."""
    import torch

    from fedprune.task import new_model

    model = new_model(experiment)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y),
                                [model.get_parameter(n) for n in masks])
    total = sum(float((g**2).sum()) for g in grads)
    return sum(float((g**2 * torch.from_numpy(m)).sum()) for g, m in zip(grads, masks.values())) / total


def mask_study(args, data_root: Path, dataset: str) -> dict:
    """IoU of each federated mask with the pooled-data mask of its criterion, per alpha and seed.
    The data-free masks do not depend on the partition (no data is read), so they are computed once
    per seed."""
    from fedprune.experiment import experiment_from_run_config

    def run_config(seed: int, alpha: float, saliency: str = "data-free") -> dict:
        overrides = (f"dataset.name={dataset} dataset.root={data_root} partition.alpha={alpha} "
                     f"pruning.density={args.density} client.batch_size={args.batch_size} sampling.min_train_nodes=1 "
                     f"pruning.snip_scoring=client-mean ntk_zo.saliency={saliency}")
        return {"experiment": "configs/ntk-zo.yaml", "seed": seed,
                "overrides": overrides + (" partition.scheme=iid" if args.quick else "")}

    data_free = {seed: (federated_mask(run_config(seed, ALPHAS[0]), args.nodes),
                        federated_mask(run_config(seed + 1000, ALPHAS[0]), args.nodes)) for seed in args.mask_seeds}
    out = {}
    for alpha in ALPHAS:
        rows = []
        for seed in args.mask_seeds:
            free, again = data_free[seed]
            local, snip = (federated_mask(run_config(seed, alpha, s), args.nodes) for s in ("local-data", "snip"))
            experiment = experiment_from_run_config(run_config(seed, alpha))
            x, y = pooled_data(experiment, args.nodes)
            pooled = pooled_masks(experiment, x, y, args.nodes, "ntk-pooled")
            pooled_again = pooled_masks(experiment, x, y, args.nodes, "ntk-pooled-again")
            random = random_mask(experiment, seed)
            batch = (x[:512], y[:512])
            rows.append({
                "seed": seed,
                "iou_data_free": iou(free, pooled["ntk"]),
                "iou_data_driven": iou(local, pooled["ntk"]),
                "iou_snip_federated_vs_pooled_snip": iou(snip, pooled["snip"]),
                "iou_snip_federated_vs_pooled_ntk": iou(snip, pooled["ntk"]),
                "iou_data_free_redrawn": iou(free, again),
                "iou_pooled_ntk_redrawn": iou(pooled["ntk"], pooled_again["ntk"]),
                "iou_pooled_snip_redrawn": iou(pooled["snip"], pooled_again["snip"]),
                "allocation_gap_data_free": allocation_gap(free, pooled["ntk"]),
                "allocation_gap_data_driven": allocation_gap(local, pooled["ntk"]),
                "iou_random_expected": args.density / (2 - args.density),
                "gradient_share_data_free": gradient_share(experiment, *batch, free),
                "gradient_share_data_driven": gradient_share(experiment, *batch, local),
                "gradient_share_random": gradient_share(experiment, *batch, random),
            })
            print(f"masks alpha {alpha} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                                  if k != "seed"), flush=True)
        out[str(alpha)] = {"per_seed": rows, **sweep.summarize(rows)}
    return out


# ---------------------------------------------------------------------------------------------- memory, upload

def memory_study(args) -> list[dict]:
    """Measured peak of one step: backprop (SGD + momentum) vs ZO (MEMORY_VARIANTS), per batch and chunk."""
    import torch

    from fedprune.experiment import load_experiment
    from fedprune.task import maskable_names, new_model
    from pruning.accounting import training_step_memory
    from pruning.selection import global_topk
    from pruning.zo import sparse_copy, zo_step_memory

    experiment = load_experiment("configs/ntk-zo.yaml", {"pruning.density": args.density})
    model = new_model(experiment)
    names = maskable_names(experiment, model)
    g = torch.Generator().manual_seed(0)
    masks = global_topk({n: torch.rand(model.get_parameter(n).shape, generator=g) for n in names}, args.density)
    loss = torch.nn.functional.cross_entropy
    nets = {"dense": (model, None), "masked": (model, masks), "sparse": sparse_copy(model, masks)}
    rows = []
    for batch in MEMORY_BATCHES:
        data = (torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
        backprop = training_step_memory(model, loss, data).peak
        for chunk in MEMORY_CHUNKS:
            for variant, (net, net_masks) in nets.items():
                zo = zo_step_memory(net, loss, data, masks=net_masks, num_perturbations=args.k, chunk=chunk)
                rows.append({"batch": batch, "chunk": chunk, "variant": variant, "backprop_peak": backprop,
                             "zo_peak": zo.peak, "ratio": zo.peak / backprop})
    return rows


def upload_study(run_config: dict) -> list[dict]:
    """Bytes of one training reply of the real client routine, per K (one local step), measured as
    the ledger measures a message."""
    from flwr.app import ConfigRecord

    from benchmarks.inprocess import InProcessGrid
    from fedprune.experiment import experiment_from_run_config
    from fedprune.task import new_model
    from strategies import build_strategy
    from strategies.ledger import content_bytes

    rows = []
    for k in UPLOAD_KS:
        rc = {**run_config, "overrides": f"{run_config['overrides']} ntk_zo.num_perturbations={k}"}
        strategy = build_strategy(experiment_from_run_config(rc))
        strategy.global_arrays = {n: v.numpy() for n, v in new_model(strategy.experiment).state_dict().items()}
        grid = InProcessGrid(rc, 2)
        node = strategy.sample(grid, 1, 1.0, 1, "sample-train")[0]
        reply = grid.send_and_receive([strategy.model_message(1, node, ConfigRecord(), "train")])[0]
        rows.append({"K": k, "reply_bytes": content_bytes(reply), "values_bytes": 4 * k})
    return rows


# ---------------------------------------------------------------------------------------------- summary, table

def _runs(results: dict, method: str, alpha: float) -> dict | None:
    return next((r for r in results["runs"] if r["method"] == method and r["alpha"] == alpha), None)


def summarize_results(results: dict) -> dict:
    """The issue's figures: memory ratio, accuracy gain and FLOPs ratio per alpha, IoUs, upload bytes."""
    summary = {"acc_gain_points": {}, "flops_ratio": {}}
    for alpha in ALPHAS:
        run = _runs(results, "ntk-zo", alpha)
        if run is None or "acc_gain_points" not in run["mean"]:
            continue
        for key in ("acc_gain_points", "flops_ratio"):
            summary[key][f"dirichlet_{alpha}"] = {"mean": run["mean"][key], "std": run["std"].get(key)}
    masked, fedavg = _runs(results, "ntk-zo", ALPHAS[0]), _runs(results, "fedavg", ALPHAS[0])
    if masked and fedavg:
        summary["memory_ratio"] = masked["mean"]["client_peak_memory"] / fedavg["mean"]["client_peak_memory"]
    masks = results.get("masks", {}).get(str(min(ALPHAS)))
    if masks:
        for key in ("iou_data_free", "iou_data_driven"):
            summary[key] = {"mean": masks["mean"][key], "std": masks["std"].get(key)}
    upload = results.get("upload")
    if upload:
        at = next(r for r in upload if r["K"] == results["setting"]["k"]) if any(
            r["K"] == results["setting"]["k"] for r in upload) else upload[0]
        summary["upload_bytes_per_client_round"] = {"K": at["K"], "local_steps": 1, "bytes": at["reply_bytes"],
                                                    "values_bytes": at["values_bytes"],
                                                    "by_K": {str(r["K"]): r["reply_bytes"] for r in upload}}
    return summary


def pm(run: dict, key: str, fmt: str = "{:.4f}") -> str:
    if run is None or key not in run["mean"]:
        return "-"
    std = run["std"].get(key)
    return fmt.format(run["mean"][key]) + ("" if std is None else " +- " + fmt.replace("+", "").format(std))


def table(results: dict) -> str:
    """README table: per alpha, dense ZO / masked ZO / backprop FedAvg; then masks, memory, upload."""
    head = ("| alpha | method | rounds | density | test acc | acc gain vs dense ZO (points) | train GFLOPs "
            "(ratio to dense ZO) | client peak MB | KB down / client-round | B up / client-round (after round 1) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for alpha in ALPHAS:
        for method in ("zo-dense", "ntk-zo", "fedavg"):
            r = _runs(results, method, alpha)
            if r is None:
                continue
            m = r["mean"]
            lines.append(
                f"| {alpha} | {method} | {r['config']['num-server-rounds']} | {m['density']:.3f} | "
                f"{pm(r, 'final_test_accuracy')} | {pm(r, 'acc_gain_points', '{:+.2f}')} | "
                f"{m['train_flops'] / 1e9:.1f} ({pm(r, 'flops_ratio', '{:.3f}')}) | "
                f"{m['client_peak_memory'] / 1e6:.2f} | {m['bytes_down_per_client_round'] / 1e3:.1f} | "
                f"{m['bytes_up_per_client_round_after_round_1']:.0f} |")
    s = results.get("summary", {})
    lines.append("")
    if "masks" in results:
        lines.append("| alpha | IoU vs pooled-data NTK mask: data-free fed. | local-data fed. | layer allocation gap: "
                     "data-free | local-data | IoU redrawn: data-free | pooled NTK | IoU SNIP fed. vs pooled SNIP "
                     "(redrawn) | IoU of random masks | gradient share kept at init: data-free | local-data | random |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for alpha, m in results["masks"].items():
            cell = lambda k: pm(m, k, "{:.3f}")  # noqa: E731
            lines.append(f"| {alpha} | {cell('iou_data_free')} | {cell('iou_data_driven')} | "
                         f"{cell('allocation_gap_data_free')} | {cell('allocation_gap_data_driven')} | "
                         f"{cell('iou_data_free_redrawn')} | {cell('iou_pooled_ntk_redrawn')} | "
                         f"{cell('iou_snip_federated_vs_pooled_snip')} ({cell('iou_pooled_snip_redrawn')}) | "
                         f"{m['mean']['iou_random_expected']:.3f} | {cell('gradient_share_data_free')} | "
                         f"{cell('gradient_share_data_driven')} | {cell('gradient_share_random')} |")
        lines.append("")
    if "memory" in results:
        lines.append("| batch | forward chunk | backprop peak MB | ZO dense MB (ratio) | ZO masked, dense weights "
                     "MB (ratio) | ZO masked, kept weights only MB (ratio) |")
        lines.append("|---|---|---|---|---|---|")
        for batch in sorted({r["batch"] for r in results["memory"]}):
            for chunk in MEMORY_CHUNKS:
                at = {r["variant"]: r for r in results["memory"] if r["batch"] == batch and r["chunk"] == chunk}
                if len(at) == len(MEMORY_VARIANTS):
                    lines.append(f"| {batch} | {chunk or 'whole'} | {at['dense']['backprop_peak'] / 1e6:.2f} | "
                                 + " | ".join(f"{at[v]['zo_peak'] / 1e6:.2f} ({at[v]['ratio']:.3f})"
                                              for v in MEMORY_VARIANTS) + " |")
        lines.append("")
    if "upload" in results:
        lines.append("| K | training reply bytes | of which the K float32 values |")
        lines.append("|---|---|---|")
        lines += [f"| {r['K']} | {r['reply_bytes']} | {r['values_bytes']} |" for r in results["upload"]]
        lines.append("")
    gains = "; ".join(f"{k}: {v['mean']:+.2f} +- {v['std'] or 0:.2f}" for k, v in s.get("acc_gain_points", {}).items())
    lines.append(
        f"Setting: {results['setting']['description']} Summary: memory ratio (masked ZO client / backprop client, "
        f"measured in the runs) {s.get('memory_ratio', float('nan')):.3f}; accuracy gain of masked over dense ZO "
        f"(points, per seed) {gains}. {report.total_note(results)}. Command: `{results['command']}`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = sweep.parser(__doc__, "ntk_zo", rounds=100, nodes=10)
    parser.add_argument("--fedavg-rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.3, help="share of the clients sampled per round")
    parser.add_argument("--k", type=int, default=20, help="perturbations per ZO step")
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4, help="ZO forward micro-batch (0: the whole batch)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--lr-dense", type=float, default=0.01)
    parser.add_argument("--lr-masked", type=float, default=0.04)
    parser.add_argument("--clip", type=float, default=5.0, help="clip of each client's scalars")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                        help="ZO step size: constant, or decayed to 0 over the run by a half cosine (the better "
                             "of the two for dense and masked ZO in benchmarks/results/zo_lr.json)")
    parser.add_argument("--mask-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=1000)
    args = sweep.parse(parser, argv)
    if args.quick:
        dataset, data_root = "mnist", args.data_root
        args.fedavg_rounds, args.mask_seeds, args.k = 1, [0], 4
    else:
        dataset, data_root = "fashion-mnist", sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
    started = time.monotonic()
    results = sweep.run(plan(args, data_root, dataset), args, row, compare)
    results["masks"] = mask_study(args, data_root, dataset)
    results["memory"] = memory_study(args)
    results["upload"] = upload_study({"experiment": "configs/ntk-zo.yaml", "num-server-rounds": 1, "seed": 0,
                                      "overrides": f"dataset.name={dataset} dataset.root={data_root} "
                                                   f"{zo_overrides(args)} ntk_zo.prune_iterations=1"})
    results["total_seconds"] = time.monotonic() - started
    schedule_text = ("step decayed to 0 over the run by a half cosine from" if args.lr_schedule == "cosine"
                     else "constant step,")
    data = (f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images"
            if not args.quick else "tiny MNIST-format files")
    results["setting"].update(
        k=args.k, local_steps=args.local_steps, batch_size=args.batch_size, chunk=args.chunk, density=args.density,
        lr_dense=args.lr_dense, lr_masked=args.lr_masked, lr_schedule=args.lr_schedule, clip=args.clip,
        fraction_train=args.fraction,
        fedavg_rounds=args.fedavg_rounds, mask_seeds=args.mask_seeds, description=(
            f"{data}, {args.nodes} clients (10% of each held out), Dirichlet 0.5 and 0.1, "
            f"{max(1, int(args.nodes * args.fraction))} sampled per round; ZO: {args.rounds} rounds of "
            f"{args.local_steps} step(s), K={args.k} forward differences, sigma 1e-3, scalars clipped to "
            f"+-{args.clip:g}, batch {args.batch_size} in micro-batches of {args.chunk}, {schedule_text} "
            f"lr {args.lr_dense} "
            f"(dense) / {args.lr_masked} (masked, density {args.density}, data-free federated NTK-SAP mask, 5 "
            f"scoring rounds, steps on the kept weights only); backprop FedAvg: {args.fedavg_rounds} rounds of 1 local epoch, SGD lr 0.05 momentum "
            f"0.9; small CNN; seeds {', '.join(map(str, args.seeds))}; in-process federation, {args.workers} runs at "
            "a time."))
    results["summary"] = summarize_results(results)
    partial = sweep.partial(results, args)
    path = (args.out if partial else report.RESULTS) / "ntk_zo.json"
    sweep.write_json(path, results)
    print(table(results))
    if not partial:
        report.update_readme([args.name])
    print(f"wrote {path} in {results['total_seconds']:.0f} s")
    return sweep.report_failures(results)


if __name__ == "__main__":
    sys.exit(main())
