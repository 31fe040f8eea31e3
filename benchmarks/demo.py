"""The default federation, as `make demo` runs it, three times: seed 42 twice and seed 7 once.

``python -m benchmarks.demo`` writes benchmarks/results/demo.json: each run's per-round test
accuracy, final accuracy and wall seconds (the whole ``flwr run``, SuperLink start included),
whether the two seed-42 runs agree round by round, and whether seed 7 differs.
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks import report
from fedprune.experiment import APP_ROOT
from fedprune.simulate import simulate

RESULTS = report.RESULTS / "demo.json"


def main() -> int:
    out = APP_ROOT / "outputs" / "bench-demo"
    runs = {}
    for name, seed in (("seed42-a", 42), ("seed42-b", 42), ("seed7", 7)):
        start = time.monotonic()
        outcome = simulate({"experiment": "configs/fedavg.yaml", "seed": seed, "run-name": name,
                            "output-dir": str(out)}, num_supernodes=10, echo=False)
        wall = time.monotonic() - start
        if not outcome.ok:
            print(f"{name}: {outcome.status} {outcome.details}")
            return 1
        records = [json.loads(line) for line in (out / name / "rounds.jsonl").read_text().splitlines()]
        runs[name] = {"seed": seed, "flwr_run_wall_seconds": wall,
                      "final_test_accuracy": records[-1]["test_accuracy"],
                      "test_accuracy_per_round": [r["test_accuracy"] for r in records]}
        print(f"{name}: final accuracy {runs[name]['final_test_accuracy']:.4f} in {wall:.0f} s", flush=True)
    a, b, c = (runs[n]["test_accuracy_per_round"] for n in ("seed42-a", "seed42-b", "seed7"))
    results = {
        "what": "the default federation (configs/fedavg.yaml: Fashion-MNIST, 10 clients, Dirichlet 0.5, "
                "small CNN) through `flwr run .` in the simulation",
        "command": "python -m benchmarks.demo",
        "runs": runs,
        "same_seed_identical_per_round": a == b,
        "other_seed_differs": a != c,
        "min_final_test_accuracy": min(r["final_test_accuracy"] for r in runs.values()),
        "max_flwr_run_wall_seconds": max(r["flwr_run_wall_seconds"] for r in runs.values()),
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
