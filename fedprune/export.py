"""A finished run's final model in the forms a device uses, their sizes, and a check that they
predict what the run's final model predicts.

``python -m fedprune.export RUN_DIR [--out DIR]`` (default ``RUN_DIR/export``) reads the run's
config.yaml, final_model.pt and final_masks.pt (written by server_app/results.py; a run written
before final_masks.pt existed has its final mask in checkpoint.pt) and writes:

* ``model.fpc``, the compact sparse form: every tensor of the final state dict as one blob of the
  wire codec (pruning/codec.py). A masked tensor travels as its mask positions and its kept values
  (the smaller of the codec's ``bitmask`` and ``rice`` encodings, at any density, so the mask
  survives); every other tensor in the codec's cheapest encoding (exact zeros go as positions).
  :func:`load_compact` rebuilds the model and its mask from this file alone.
* ``slim.pt2``, where the mask removes whole units of a chain model (pruning/slim.py: a filter or
  neuron whose weight row, bias and BatchNorm affine parameters are all masked, as AutoFLIP's hybrid
  pruning does): the physically smaller dense model, exact by construction, as a ``torch.export``
  program (``torch.export.load(path).module()`` runs it, any batch size). FedDP's pruning is per
  sample (pruning/gates.py) and has no static slim form; its model exports in the compact form.
* ``dense.pt``, the reference: the final model's float32 state dict (``torch.save``).
* ``export.json``: the file sizes against ``dense.pt`` and the check.

The check, on the experiment's test set: the compact model must hold the final model's values and
mask exactly and so give the same logits; the slim model must give the same argmax predictions
(its kernels sum over fewer channels, so logits may differ by float rounding: the agreement and
the largest logit difference are reported). Exit status: 0 when the check passes, 1 when it fails,
2 when the input is not a finished run (the message says what is wrong; no traceback).

The loader needs torch, numpy, the codec and the model definitions (fedprune/models.py) only; the
export side also reads the experiment and the data, imported where they are used.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedprune.models import build_model
from pruning.codec import CodecError, decode_with_mask, encode, encoding_sizes

MAGIC = b"FPC1"
"""First bytes of a compact model file; then a uint32 (little-endian) header length, the JSON
header (``model``: the build_model arguments; ``tensors``: ``[name, blob bytes, masked]`` in file
order) and the codec blobs one after the other."""
FINAL_MODEL, FINAL_MASKS, CHECKPOINT = "final_model.pt", "final_masks.pt", "checkpoint.pt"
"""The run directory's files the export reads, as server_app/results.py writes them."""
COMPACT, SLIM, DENSE, REPORT = "model.fpc", "slim.pt2", "dense.pt", "export.json"


class ExportError(ValueError):
    """Input that is not a finished run's directory; says what is wrong and what is expected."""


# ---------------------------------------------------------------------------------------------
# the compact form


def _blob(tensor: torch.Tensor, mask: torch.Tensor | None) -> bytes:
    if mask is None:
        return encode(tensor)
    sizes = encoding_sizes(tensor, mask)
    return encode(tensor, mask, encoding=min(("bitmask", "rice"), key=sizes.__getitem__))


def save_compact(path: Path, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 model: Mapping[str, object]) -> None:
    """Write ``state`` (zeroed outside ``masks``) and the masks as one compact file; ``model`` holds
    :func:`~fedprune.models.build_model`'s arguments (``name``, ``in_channels``, ``num_classes``,
    ``image_size``)."""
    blobs = {name: _blob(t, masks.get(name)) for name, t in state.items()}
    header = json.dumps({"model": dict(model),
                         "tensors": [[name, len(b), name in masks] for name, b in blobs.items()]}).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs.values()))


def load_compact(path: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (in eval mode) and its mask (name -> bool tensor) from a file of
    :func:`save_compact`. Raises :class:`~pruning.codec.CodecError` on a malformed file."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC or len(data) < 8:
        raise CodecError(f"{path}: not a compact model file (it starts with {MAGIC!r})")
    (length,) = struct.unpack_from("<I", data, 4)
    try:
        header = json.loads(data[8:8 + length])
        spec, entries = header["model"], header["tensors"]
        model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], spec["image_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"{path}: bad header ({exc})") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, masks, at = {}, {}, 8 + length
    for name, size, masked in entries:
        if name not in shapes:
            raise CodecError(f"{path}: {name} is not a tensor of model {spec['name']!r}")
        try:
            state[name], carried = decode_with_mask(data[at:at + size], shape=shapes[name])
        except CodecError as exc:
            raise CodecError(f"{path}: {name}: {exc}") from None
        if masked:
            masks[name] = carried
        at += size
    if at != len(data) or state.keys() != shapes.keys():
        raise CodecError(f"{path}: holds {len(data) - at} bytes after its blobs or lacks tensors of model "
                         f"{spec['name']!r}: {sorted(shapes.keys() - state.keys())[:3]}")
    model.load_state_dict(state)
    return model.eval(), masks


# ---------------------------------------------------------------------------------------------
# the run directory


def _load(path: Path) -> dict:
    try:
        content = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise ExportError(f"{path} cannot be read ({exc}); expected the file a finished run writes") from None
    if not isinstance(content, dict):
        raise ExportError(f"{path} holds a {type(content).__name__}; expected the dict a finished run writes")
    return content


def read_run(run_dir: Path):
    """(experiment, final state dict, final masks) of a finished run; :class:`ExportError` otherwise."""
    from fedprune.experiment import ExperimentError, load_experiment

    layout = "a run directory holds config.yaml, rounds.jsonl, summary.json and final_model.pt"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such directory; expected a run directory ({layout})")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory: no config.yaml ({layout})")
    if not (run_dir / "summary.json").is_file():
        raise ExportError(f"{run_dir}: the run has not finished (no summary.json, which a run writes when it "
                          "ends); export a finished run")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except ValueError as exc:
        raise ExportError(f"{run_dir}/summary.json is not valid JSON ({exc})") from None
    if summary.get("status") != "completed":
        why = f": {summary['error']}" if summary.get("error") else ""
        raise ExportError(f"{run_dir}: the run did not complete (status {summary.get('status')!r}{why}); "
                          "export a completed run")
    try:
        experiment = load_experiment(run_dir / "config.yaml")
    except ExperimentError as exc:
        raise ExportError(f"{run_dir}/config.yaml: {exc}") from None
    if not (run_dir / FINAL_MODEL).is_file():
        raise ExportError(f"{run_dir}: no {FINAL_MODEL}; a completed run writes it with summary.json")
    state = _load(run_dir / FINAL_MODEL)
    masks, source = _final_masks(run_dir, summary.get("rounds"))
    for name, mask in masks.items():
        if name not in state or mask.dtype != torch.bool or mask.shape != state[name].shape:
            raise ExportError(f"{source}: {name} is not a bool mask over a tensor of {FINAL_MODEL}")
        if state[name][~mask].any():
            raise ExportError(f"{source} does not belong to {FINAL_MODEL}: {name} is not zero where it is masked")
    return experiment, state, masks


def _final_masks(run_dir: Path, rounds) -> tuple[dict[str, torch.Tensor], Path]:
    if (run_dir / FINAL_MASKS).is_file():
        return _load(run_dir / FINAL_MASKS), run_dir / FINAL_MASKS
    if (run_dir / CHECKPOINT).is_file():
        checkpoint = _load(run_dir / CHECKPOINT)
        if checkpoint.get("round") == rounds:
            return checkpoint.get("masks") or {}, run_dir / CHECKPOINT
    raise ExportError(f"{run_dir}: the final mask is unknown: no {FINAL_MASKS} and no {CHECKPOINT} of the last "
                      f"round ({rounds}); a finished run writes {FINAL_MASKS}")


# ---------------------------------------------------------------------------------------------
# export and check


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` (already in eval mode) on ``x``, in batches."""
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Share of identical argmax predictions and the largest absolute logit difference."""
    return {"agreement": float((reference.argmax(1) == logits.argmax(1)).double().mean()),
            "max_logit_diff": float((reference - logits).abs().max())}


def _size(path: Path, dense: int) -> dict:
    size = path.stat().st_size
    return {"file": path.name, "bytes": size, "vs_dense": size / dense}


def save_slim(path: Path, model: nn.Module, masks: Mapping[str, torch.Tensor], example: torch.Tensor) -> dict | None:
    """Where ``masks`` remove whole units of ``model`` (a chain, pruning/slim.py), save the smaller
    model as a ``torch.export`` program (batch size free) and return its parameter count and units
    per layer; None otherwise. ``example`` is a small input batch, kept in the program."""
    from pruning.slim import chain_of

    chain = chain_of(model, example) if masks else None
    kept = chain.kept_units(masks) if chain is not None else []
    if all(k.all() for k in kept):
        return None
    slim = chain.slim(model, kept).model.eval()
    torch.export.save(torch.export.export(slim, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), path)
    return {"parameters": sum(p.numel() for p in slim.parameters()), "units_kept": [int(k.sum()) for k in kept],
            "units": [layer.units for layer in chain.layers]}


def export(run_dir: Path, out: Path) -> dict:
    """Write the forms of the run's final model into ``out`` and check them; returns (and writes
    as export.json) the report. Raises :class:`ExportError` on bad input."""
    from fedprune.data import SPECS
    from fedprune.task import new_model, test_data

    experiment, state, masks = read_run(run_dir)
    model = new_model(experiment)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{run_dir / FINAL_MODEL} does not fit model {experiment.model.name!r}: {exc}") from None
    model.eval()
    try:
        test_x, test_y = test_data(experiment.dataset.name, experiment.dataset.root)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"the check needs the run's test set: {exc}") from None
    batch = experiment.evaluation.batch_size
    reference = predict(model, test_x, batch)

    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, out / DENSE)
    dense = (out / DENSE).stat().st_size
    spec = SPECS[experiment.dataset.name]
    save_compact(out / COMPACT, state, masks, {"name": experiment.model.name, "in_channels": spec.channels,
                                               "num_classes": spec.num_classes, "image_size": spec.size})
    compact, compact_masks = load_compact(out / COMPACT)
    identical = all(torch.equal(v, state[k]) for k, v in compact.state_dict().items()) and \
        compact_masks.keys() == masks.keys() and all(torch.equal(m, masks[k]) for k, m in compact_masks.items())
    check = {"test_examples": len(test_y),
             "compact": {**compare(reference, predict(compact, test_x, batch)), "identical_state": identical}}
    parameters = sum(p.numel() for p in model.parameters())
    files = {"dense": {"file": DENSE, "bytes": dense, "vs_dense": 1.0,
                       "tensor_bytes": sum(v.numel() * v.element_size() for v in state.values())},
             "compact": _size(out / COMPACT, dense)}

    (out / SLIM).unlink(missing_ok=True)  # from an earlier export into the same directory
    slim = save_slim(out / SLIM, model, masks, test_x[:2].clone())  # a slice would keep the whole test set
    if slim is not None:
        check["slim"] = compare(reference, predict(torch.export.load(out / SLIM).module(), test_x, batch))
        files["slim"] = {**_size(out / SLIM, dense), **slim}
    check["passed"] = identical and all(check[f]["agreement"] == 1.0 for f in ("compact", "slim") if f in check)
    maskable = sum(m.numel() for m in masks.values())
    report = {"run_dir": str(run_dir), "method": experiment.method, "model": experiment.model.name,
              "density": sum(int(m.sum()) for m in masks.values()) / maskable if maskable else 1.0,
              "parameters": parameters, "files": files, "check": check}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def render(report: dict, out: Path) -> str:
    """The report as a reader wants it on the console."""
    lines = [f"{report['run_dir']} ({report['method']}, {report['model']}, {report['parameters']:,} parameters, "
             f"mask density {report['density']:.3f}) -> {out}"]
    for form, f in report["files"].items():
        extra = ""
        if form == "slim":
            extra = f"  {f['parameters']:,} parameters; units per layer {f['units_kept']} of {f['units']}"
        lines.append(f"  {form:8s} {f['file']:11s} {f['bytes']:>12,} bytes  {f['vs_dense']:6.3f} of dense{extra}")
    check = report["check"]
    results = [f"{form} {check[form]['agreement']:.2%} same predictions (max logit diff "
               f"{check[form]['max_logit_diff']:.2g})" for form in ("compact", "slim") if form in check]
    if not check["compact"]["identical_state"]:
        results.append("compact state differs from the final model")
    lines.append(f"  check on {check['test_examples']:,} test examples: {', '.join(results)}: "
                 f"{'passed' if check['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's directory")
    parser.add_argument("--out", type=Path, default=None, help="where the files go (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "export"
    try:
        report = export(args.run_dir, out)
    except ExportError as exc:
        print(f"fedprune.export: {exc}", file=sys.stderr)
        return 2
    print(render(report, out))
    return 0 if report["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
