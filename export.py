"""Export a trained network to ONNX, check it against PyTorch, and time it in onnxruntime.

    python export.py checkpoints/wrn_40_2_student_KT.t7            # -> checkpoints/<name>.onnx
    python export.py checkpoints/x.t7 -o deploy/x.onnx --threads 1 --int8 --calib 512 --val 2000

Writes <name>.onnx (input `input`: normalised images (N, 3, H, W), float32, any N; output
`logits`) and <name>.json beside it: what a deployment needs to feed it (input size,
normalisation, class names) and what was checked (parity with PyTorch, latencies, versions).
Nothing is written unless the exported logits match PyTorch's on validation images (max
|difference| <= --tol, the same top-1 class on every image). --int8 adds <name>.int8.onnx, a
static int8 quantisation calibrated on training images. See docs/export.md.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

import torch
import torch.nn as nn

from blockswap.count_ops import measure_model
from blockswap.cli import HelpFormatter, at_least, positive, run_cli
from blockswap.files import atomic_write, check_writable, load_checkpoint, model_from_checkpoint
from blockswap.latency import CLOCKS, REPEATS, WARMUP, Timing, thread_count, time_side_by_side
from blockswap.loaders import DATASETS, NUM_CLASSES, DataSpec, get_datasets, subset
from models.archs import Network
from models.blocks import UserError, load_block_module
from blockswap.onnx_export import (INPUT, OUTPUT, PARITY_TOL, accuracy, batchnorm_nodes,
                         expected_batchnorms, export_onnx, make_session, opset, parity,
                         quantise_int8, run_session, session_callable, versions)

CLASSES_TO_DATASET = {n: dataset for dataset, n in NUM_CLASSES.items()}
CHUNK = 64   # images per forward while checking (bounds memory at 224 px)


def get_args_parser():
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX, check it, time it.",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by main.py (checkpoints/<name>.t7)")
    p.add_argument("-o", "--output", default=None,
                   help="the .onnx file (default: the checkpoint's path with .onnx); "
                        "<name>.json (and <name>.int8.onnx) go beside it")
    p.add_argument("--module", default=None,
                   help="Python file that registers the checkpoint's own block types")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="default: the checkpoint's (else from its class count)")
    g.add_argument("--data_loc", default=None,
                   help="data folder (default: the one the checkpoint was trained on)")
    g.add_argument("--parity", default=256, type=at_least(1),
                   help="validation images the exported logits are compared on")
    g.add_argument("--tol", default=PARITY_TOL, type=positive(),
                   help="largest |logit difference| allowed against PyTorch (fp32)")
    g.add_argument("--seed", default=0, type=int, help="picks the images")
    g = p.add_argument_group("latency")
    g.add_argument("--batch", default=32, type=at_least(1), help="timed at batch 1 and at this batch")
    g.add_argument("--threads", default=None, type=at_least(1),
                   help="threads of both runtimes (default: torch's own count)")
    g.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall time, or this process's CPU time (steadier on a shared CPU)")
    g.add_argument("--repeats", default=REPEATS, type=at_least(1),
                   help="timed calls per pass (the median counts; after a few warm-up calls)")
    g = p.add_argument_group("int8")
    g.add_argument("--int8", action="store_true",
                   help="also write <name>.int8.onnx: static int8 (QDQ, per-channel)")
    g.add_argument("--calib", default=256, type=at_least(1), help="training images int8 is calibrated on")
    g.add_argument("--val", default=1000, type=at_least(1),
                   help="validation images fp32 and int8 accuracy are measured on")
    return p


# --------------------------------------------------------------------------------------------
# Inputs: checked before any work
# --------------------------------------------------------------------------------------------

def output_paths(args) -> Dict[str, str]:
    """{'onnx', 'json', 'int8'}: where the files go; the folder must be writable."""
    onnx_path = args.output or os.path.splitext(args.checkpoint)[0] + ".onnx"
    if not onnx_path.endswith(".onnx"):
        raise UserError(f"-o {onnx_path}: the output must be a .onnx file")
    if os.path.isdir(onnx_path):
        raise UserError(f"-o {onnx_path} is a folder; name the .onnx file to write")
    check_writable(os.path.dirname(os.path.abspath(onnx_path)), "-o")
    stem = onnx_path[:-len(".onnx")]
    return {"onnx": onnx_path, "json": stem + ".json", "int8": stem + ".int8.onnx"}


def data_source(args, ckpt: dict, num_classes: int):
    """(dataset, folder): the flags, else what the checkpoint was trained on."""
    trained = ckpt.get("args") or {}
    dataset = args.dataset or trained.get("dataset") or CLASSES_TO_DATASET.get(num_classes)
    if dataset is None:
        raise UserError(f"{args.checkpoint} has {num_classes} classes and names no data set: "
                        "pass --dataset")
    folder = args.data_loc or trained.get("data_loc") or \
        trained.get("imagenet_loc" if dataset == "imagenet" else "cifar_loc")
    if not folder or not os.path.isdir(folder):
        raise UserError(f"no {dataset} data at {folder!r} (the parity check runs on validation "
                        "images): pass --data_loc")
    return dataset, folder


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def batches(ds, n: int, seed: int) -> List[tuple]:
    """A fixed random n images of ds as (images, labels) batches of up to CHUNK."""
    part = subset(ds, n, seed)
    loader = torch.utils.data.DataLoader(part, CHUNK, shuffle=False)
    return [(x, y) for x, y in loader]


def load_data(args, ckpt: dict, num_classes: int) -> dict:
    """Validation images (parity, accuracy), training images without augmentation
    (calibration), and the preprocessing a deployment must repeat."""
    dataset, folder = data_source(args, ckpt, num_classes)
    trained = ckpt.get("args") or {}   # the images it was trained on (size, recipe)
    spec = DataSpec.of(dataset, trained.get("image_size"), ckpt.get("arch"))
    train_set, val_set, found = get_datasets(dataset, folder, spec=spec)
    if found != num_classes:
        raise UserError(f"{args.checkpoint} has {num_classes} classes but {folder} has {found}")
    train_set.transform = val_set.transform   # calibrate on images as inference sees them
    n_val = max(args.parity, args.val if args.int8 else 0)
    val = batches(val_set, n_val, args.seed)
    return {"dataset": dataset, "val": val, "classes": list(getattr(val_set, "classes", [])),
            "calib": batches(train_set, args.calib, args.seed) if args.int8 else [],
            "transform": val_set.transform, "image_size": spec.image_size}


def first(data: List[tuple], n: int) -> List[tuple]:
    """The first n images of (images, labels) batches, as such batches."""
    out, left = [], n
    for x, y in data:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(out[-1][1])
    return out


def timing_batch(data: List[tuple], batch: int) -> torch.Tensor:
    """`batch` validation images (repeated when there are fewer): the timed input."""
    x = torch.cat([b for b, _ in first(data, batch)])
    return x.repeat(-(-batch // len(x)), 1, 1, 1)[:batch].contiguous()


def preprocessing(transform) -> dict:
    """What a deployment does to an RGB image before the network: the validation transform's
    steps, and its normalisation."""
    steps = list(getattr(transform, "transforms", [transform]))
    norm = next((t for t in steps if type(t).__name__ == "Normalize"), None)
    return {"steps": [repr(t) for t in steps],
            "mean": [float(v) for v in norm.mean] if norm else None,
            "std": [float(v) for v in norm.std] if norm else None}


# --------------------------------------------------------------------------------------------
# Export, checks, timing
# --------------------------------------------------------------------------------------------

def check_parity(model: nn.Module, session, images: List[torch.Tensor], tol: float) -> dict:
    """Parity figures; UserError (nothing written) when they fail."""
    result = parity(model, session, images)
    if not result.passes(tol):
        raise UserError(f"the ONNX export does not match PyTorch on {result.images} validation "
                        f"images (max |logit difference| {result.max_abs_diff:.3g}, allowed "
                        f"{tol:g}; top-1 agreement {result.top1_agreement:.2%}): nothing written")
    return {"images": result.images, "max_abs_diff": result.max_abs_diff,
            "top1_agreement": result.top1_agreement, "tol": tol}


def latencies(runs: Dict[str, object], data: List[tuple], args, threads: int) -> Dict:
    """{batch: {runtime: ms}} at batch 1 and --batch, on validation images, interleaved."""
    out = {}
    for batch in dict.fromkeys([1, args.batch]):
        timing = Timing("cpu", batch, threads, args.clock, min(WARMUP, args.repeats),
                        args.repeats)
        out[str(batch)] = time_side_by_side(runs, timing_batch(data, batch), timing)
    return out


def int8_report(int8: bytes, sessions: dict, ms: dict, model_bytes: int, data: dict,
                args) -> dict:
    """The int8 model's figures beside fp32's: accuracy on --val images, size, and the latency
    measured with the others (ms: {batch: {'onnxruntime', 'int8', ...}})."""
    val = first(data["val"], args.val)
    acc = {name: accuracy(lambda x, s=s: run_session(s, x), val) for name, s in sessions.items()}
    return {"proto": int8, "images": sum(len(y) for _, y in val),
            "calibration_images": sum(len(x) for x, _ in data["calib"]),
            "accuracy": acc, "size_bytes": {"fp32": model_bytes, "int8": len(int8)},
            "latency_ms": {b: {"fp32": m["onnxruntime"], "int8": m["int8"]}
                           for b, m in ms.items()}}


def record(model: nn.Module, checkpoint: str, data: dict, checks: dict,
           paths: Dict[str, str]) -> dict:
    """The JSON beside the .onnx file: how to feed it, and what was checked."""
    net = Network.of(model)
    size = data["image_size"]
    return {
        "onnx": os.path.basename(paths["onnx"]), "checkpoint": os.path.abspath(checkpoint),
        "network": net.name, "family": {"arch": net.arch, "depth": net.depth,
                                        "width": net.width},
        "genotype": list(model.genotype), "num_classes": net.classes,
        "classes": data["classes"], "dataset": data["dataset"],
        "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "layout": "NCHW, RGB", "image_size": size,
                  "preprocessing": preprocessing(data["transform"])},
        "output": {"name": OUTPUT, "shape": ["batch", net.classes]},
        **{k: checks[k] for k in ("params", "macs", "size_bytes", "batchnorms", "parity",
                                  "threads", "clock", "latency_ms")},
        "int8": checks.get("int8"), "versions": checks["versions"],
    }


def write_files(paths: Dict[str, str], model: bytes, meta: dict, int8: bytes = None) -> None:
    """Each file (serialised models) atomically; the JSON last, so it never describes a file
    not yet written."""
    atomic_write(paths["onnx"], lambda f: f.write(model))
    if int8 is not None:
        atomic_write(paths["int8"], lambda f: f.write(int8))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(paths["json"], lambda f: f.write(text.encode()))


def report(checks: dict, paths: Dict[str, str]) -> None:
    bn = checks["batchnorms"]
    print(f"params {checks['params']:,}  MACs {checks['macs']:,}  file "
          f"{checks['size_bytes'] / 1e6:.2f} MB  BatchNorms left {bn['left']} "
          f"(after residual sums: {bn['expected']})")
    par = checks["parity"]
    print(f"parity on {par['images']} validation images: max |logit difference| "
          f"{par['max_abs_diff']:.2g}, top-1 agreement {par['top1_agreement']:.1%}")
    print(f"latency (threads {checks['threads']}, {checks['clock']} clock, fastest of "
          "agreeing passes):")
    for batch, ms in checks["latency_ms"].items():
        print(f"  batch {batch:>3}: torch eager {ms['torch']:.3f} ms, onnxruntime "
              f"{ms['onnxruntime']:.3f} ms ({ms['torch'] / ms['onnxruntime']:.2f}x)")
    if checks.get("int8"):
        report_int8(checks["int8"])
    print(f"-> {paths['onnx']}, {paths['json']}" +
          (f", {paths['int8']}" if checks.get("int8") else ""))


def report_int8(q: dict) -> None:
    size, acc = q["size_bytes"], q["accuracy"]
    print(f"int8 (calibrated on {q['calibration_images']} training images): accuracy on "
          f"{q['images']} validation images fp32 {acc['fp32']:.2%}, int8 {acc['int8']:.2%}; "
          f"size {size['fp32'] / 1e6:.2f} -> {size['int8'] / 1e6:.2f} MB")
    for batch, ms in q["latency_ms"].items():
        print(f"  batch {batch:>3}: onnxruntime fp32 {ms['fp32']:.3f} ms, int8 "
              f"{ms['int8']:.3f} ms ({ms['fp32'] / ms['int8']:.2f}x)")
    slower = [b for b, ms in q["latency_ms"].items() if ms["int8"] > ms["fp32"]]
    if slower:
        print(f"warning: int8 is slower than fp32 at batch {' and '.join(slower)} on this "
              "machine (it can be, for depthwise and grouped blocks): deploy the fp32 file here",
              file=sys.stderr)


def main(args):
    paths = output_paths(args)
    ckpt = load_checkpoint(args.checkpoint)
    if args.module:
        load_block_module(args.module)
    model = model_from_checkpoint(ckpt, args.checkpoint).eval()
    data = load_data(args, ckpt, model.num_classes)
    checks = export_and_check(model, data, args)
    int8 = checks["int8"].pop("proto") if checks.get("int8") else None
    meta = record(model, args.checkpoint, data, checks, paths)
    write_files(paths, checks.pop("proto"), meta, int8)
    report(checks, paths)
    return checks


def export_and_check(model: nn.Module, data: dict, args) -> dict:
    """Export, BatchNorm count, parity (raises on failure), sizes, latencies, int8."""
    size = data["image_size"]
    example = data["val"][0][0][:1]
    proto = export_onnx(model, example)
    blob = proto.SerializeToString()   # once: the session, the size and the file
    with thread_count(args.threads) as threads:
        session = make_session(blob, threads)
        checks = {"proto": blob, "threads": threads, "clock": args.clock,
                  "parity": check_parity(model, session, [x for x, _ in first(
                      data["val"], args.parity)], args.tol),
                  "batchnorms": {"left": batchnorm_nodes(proto),
                                 "expected": expected_batchnorms(model, example)},
                  "size_bytes": len(blob),
                  "versions": {**versions(), "opset": opset(proto)}}
        checks["macs"], checks["params"] = measure_model(model, size, size)
        runs = {"torch": model, "onnxruntime": session_callable(session)}
        if args.int8:   # timed with the others: fp32 is timed once, interleaved with both
            int8 = quantise_int8(proto, [x for x, _ in data["calib"]]).SerializeToString()
            int8_session = make_session(int8, threads)
            runs["int8"] = session_callable(int8_session)
        ms = latencies(runs, data["val"], args, threads)
        checks["latency_ms"] = {b: {k: m[k] for k in ("torch", "onnxruntime")}
                                for b, m in ms.items()}
        if args.int8:
            checks["int8"] = int8_report(int8, {"fp32": session, "int8": int8_session}, ms,
                                         checks["size_bytes"], data, args)
    if checks["batchnorms"]["left"] != checks["batchnorms"]["expected"]:
        print(f"warning: {checks['batchnorms']['left']} BatchNorms left in the graph, "
              f"{checks['batchnorms']['expected']} expected (those after residual sums): "
              "this exporter did not fold every BatchNorm into its convolution", file=sys.stderr)
    return checks


if __name__ == "__main__":
    run_cli(main, get_args_parser())
