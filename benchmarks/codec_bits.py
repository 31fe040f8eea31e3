"""Bits per parameter of the wire codec against the entropy bound.

A small CNN with PyTorch's default initialisation (about 290k parameters) is pruned by global
magnitude to each density; every masked weight tensor is encoded with ``encoding="auto"`` (the
receiver does not hold the mask) for float32 and float16 values. Reported per density and value
dtype:

* ``measured_bpp``: encoded bits (headers included) per masked parameter;
* ``bound_bpp``: ``H(d) + d * value_bits`` at the realised global density ``d``;
* ``per_tensor_bound_bpp``: the same bound per tensor at its own density, averaged by size (what a
  per-tensor coder can reach; below ``bound_bpp`` since global magnitude spreads densities unevenly);
* ``header_bpp``: the fixed per-tensor headers, in bits per parameter;
* ``ratio_vs_bound_plus_headers`` = measured / (bound + headers), and ``ratio_vs_bound``.

Target: ``ratio_vs_bound_plus_headers <= 1.10``. Also listed: the ``values`` encoding (mask already
at the receiver) and the whole state dict (biases, BatchNorm parameters and buffers dense).

Run: ``python benchmarks/codec_bits.py`` (writes benchmarks/results/codec_bits.json).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning import (  # noqa: E402
    ENCODINGS,
    decode,
    encode,
    entropy_bound_bits,
    global_topk,
    header_bytes,
    magnitude_scores,
    prunable_names,
)

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)
VALUE_DTYPES = {"float32": 32, "float16": 16}
TARGET = 1.10
OUT = Path(__file__).resolve().parent / "results" / "codec_bits.json"


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 96), nn.ReLU(), nn.Linear(96, 10),
    )


def main() -> dict:
    torch.manual_seed(0)
    model = small_cnn()
    names = prunable_names(model)
    params = dict(model.named_parameters())
    state = model.state_dict()
    n_masked = sum(params[n].numel() for n in names)
    n_state = sum(t.numel() for t in state.values())
    headers = sum(header_bytes(params[n].dim()) for n in names)
    scores = magnitude_scores(model, names)

    rows = []
    for d in DENSITIES:
        masks = global_topk(scores, d)
        realised = sum(int(m.sum()) for m in masks.values()) / n_masked
        for vdt, vbits in VALUE_DTYPES.items():
            nbytes, values_only, counts = 0, 0, dict.fromkeys(ENCODINGS, 0)
            per_tensor_bound = 0.0
            for n in names:
                blob = encode(params[n], masks[n], value_dtype=vdt)
                back = decode(blob)
                ref = params[n].detach().masked_fill(~masks[n], 0)
                ref = ref.half().float() if vdt == "float16" else ref
                assert torch.equal(back, ref), n
                nbytes += len(blob)
                counts[ENCODINGS[blob[1] & 7]] += 1
                values_only += len(encode(params[n], masks[n], value_dtype=vdt, encoding="values"))
                d_l = float(masks[n].float().mean())
                per_tensor_bound += masks[n].numel() * entropy_bound_bits(d_l, vbits)
            state_bytes = nbytes + sum(
                len(encode(t, value_dtype=vdt)) for k, t in state.items() if k not in masks)
            measured = 8 * nbytes / n_masked
            bound = entropy_bound_bits(realised, vbits)
            header_bpp = 8 * headers / n_masked
            rows.append({
                "density": d,
                "realised_density": round(realised, 6),
                "value_dtype": vdt,
                "measured_bpp": round(measured, 5),
                "bound_bpp": round(bound, 5),
                "per_tensor_bound_bpp": round(per_tensor_bound / n_masked, 5),
                "header_bpp": round(header_bpp, 5),
                "ratio_vs_bound_plus_headers": round(measured / (bound + header_bpp), 5),
                "ratio_vs_bound": round(measured / bound, 5),
                "ratio_vs_per_tensor_bound_plus_headers": round(
                    measured / (per_tensor_bound / n_masked + header_bpp), 5),
                "encodings_chosen": {k: v for k, v in counts.items() if v},
                "values_only_bpp": round(8 * values_only / n_masked, 5),
                "state_dict_bytes": state_bytes,
                "state_dict_dense_bytes": 4 * n_state if vdt == "float32" else None,
            })

    result = {
        "what": "wire codec bits per masked parameter vs H(d) + d*value_bits (global magnitude masks)",
        "command": "python benchmarks/codec_bits.py",
        "model": "small CNN (3 conv + BN, 2 linear), default init, seed 0",
        "masked_tensors": names,
        "masked_params": n_masked,
        "state_dict_params": n_state,
        "header_bytes_per_tensor": "8 + 4*ndim",
        "header_bytes_total": headers,
        "target": f"ratio_vs_bound_plus_headers <= {TARGET}",
        "meets_target": all(r["ratio_vs_bound_plus_headers"] <= TARGET for r in rows),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{n_masked} masked params in {len(names)} tensors, headers {headers} B")
    print(f"{'d':>5} {'dtype':>7} {'measured':>9} {'bound':>8} {'hdr':>7} {'/(b+h)':>7} {'/b':>7}"
          f" {'values':>8}  encodings")
    for r in rows:
        print(f"{r['density']:>5} {r['value_dtype']:>7} {r['measured_bpp']:>9.4f} {r['bound_bpp']:>8.4f}"
              f" {r['header_bpp']:>7.4f} {r['ratio_vs_bound_plus_headers']:>7.4f} {r['ratio_vs_bound']:>7.4f}"
              f" {r['values_only_bpp']:>8.4f}  {r['encodings_chosen']}")
    print(f"target {result['target']}: {'met' if result['meets_target'] else 'NOT met'} -> {OUT}")
    return result


if __name__ == "__main__":
    main()
