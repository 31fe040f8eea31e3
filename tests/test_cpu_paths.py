"""The allocator setting every fedprune process applies: freed memory is reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

from fedprune.allocator import keep_freed_memory
from fedprune.experiment import APP_ROOT

CHILD = """
import json, resource, sys, torch
from fedprune.allocator import keep_freed_memory
from fedprune.models import build_model
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "1" else False
model, x, y = build_model("cnn", 1, 10, 28), torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
for i in range(30):  # training steps of the small CNN
    if i == 5:  # past the first steps, which fault the heap in whatever the setting
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(model(x), y).backward()
print(json.dumps([applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start]))
"""


def faults(keep: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(int(keep))], cwd=APP_ROOT, capture_output=True,
                         text=True, check=True)
    applied, count = json.loads(out.stdout.strip().splitlines()[-1])
    return applied, count


def test_keep_freed_memory_ends_the_page_faults_of_every_training_step():
    applied, kept = faults(True)
    assert applied, "this machine runs glibc: the thresholds must be set"
    _, default = faults(False)
    # default: a step's freed blocks go back to the OS and are faulted in again, hundreds of faults a step
    assert kept < 2_000 and default > 8_000, (default, kept)


def test_keep_freed_memory_applies_once_per_process():
    assert keep_freed_memory() is keep_freed_memory()
