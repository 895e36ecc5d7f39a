"""Eager PyTorch against onnxruntime, fp32 and int8, for one genotype (prints figures, asserts
nothing).

    python bench/bench_export.py            # genotypes/bs800k.csv in WRN-40-2, random weights,
                                            # batch 1, 1 thread (a minute or two idle)
    python bench/bench_export.py --checkpoint checkpoints/<name>.t7   # a trained network
    python bench/bench_export.py --quick    # WRN-10-1 of every sixth block type: a smoke test

The network is exported as export.py exports it (onnx_export.export_onnx), checked for parity
on random images, quantised to int8 (static, QDQ, per-channel, calibrated on --calib random
images: enough for timing, not for accuracy), and the three are timed on the same input with
the same threads, the fastest of agreeing passes (latency.time_side_by_side). The last two lines:

    int8: onnxruntime fp32 B ms, int8 C ms, ratio Sx
    export: torch eager A ms, onnxruntime B ms, ratio Rx
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap.files import load_checkpoint, model_from_checkpoint  # noqa: E402
from blockswap.funcs import load_genotype
from blockswap.latency import Timing, thread_count, time_side_by_side  # noqa: E402
from models import Network  # noqa: E402
from blockswap.onnx_export import (batchnorm_nodes, expected_batchnorms, export_onnx,  # noqa: E402
                         make_session, parity, quantise_int8,
                         session_callable)


def get_args_parser():
    p = argparse.ArgumentParser(description="Eager torch against onnxruntime (fp32, int8).")
    p.add_argument("--genotype", default="genotypes/bs800k.csv")
    p.add_argument("--wrn_depth", default=40, type=int)
    p.add_argument("--wrn_width", default=2, type=int)
    p.add_argument("--checkpoint", default=None, help="a trained network instead of --genotype")
    p.add_argument("--batch", default=1, type=int)
    p.add_argument("--threads", default=1, type=int,
                   help="threads of both runtimes (1: on a shared CPU, more wait on each other)")
    p.add_argument("--clock", default="cpu", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time, which with one thread is the wall time "
                        "an idle machine shows")
    p.add_argument("--repeats", default=25, type=int, help="timed calls per pass")
    p.add_argument("--calib", default=64, type=int, help="random images int8 is calibrated on")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--quick", action="store_true",
                   help="WRN-10-1 of every sixth block type of --genotype, 3 calls per pass")
    return p


def build(args):
    """(network, description): the checkpoint's, else --genotype at random weights."""
    if args.checkpoint:
        return model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint), \
            args.checkpoint
    genotype = load_genotype(args.genotype)
    if args.quick:
        genotype = genotype[::6][:3]
    net = Network("wrn", args.wrn_depth, args.wrn_width)
    torch.manual_seed(args.seed)
    return net.build(genotype), f"{net.name} {args.genotype}, random weights"


def main(args):
    if args.quick:
        args.wrn_depth, args.wrn_width, args.repeats, args.calib = 10, 1, 3, 4
    model, what = build(args)
    model.eval()
    size = Network.of(model).image_size
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    proto = export_onnx(model, x)
    int8 = quantise_int8(proto, [torch.randn(min(args.calib, 16), 3, size, size, generator=g)
                                 for _ in range(-(-args.calib // 16))])
    with thread_count(args.threads) as threads:
        fp32_session, int8_session = make_session(proto, threads), make_session(int8, threads)
        check = parity(model, fp32_session, [x])
        timing = Timing("cpu", args.batch, threads, args.clock, min(5, args.repeats),
                        args.repeats)
        ms = time_side_by_side({"torch": model, "fp32": session_callable(fp32_session),
                                "int8": session_callable(int8_session)}, x, timing)
    print(f"{what}: batch {args.batch}, threads {threads}, {args.clock} clock; "
          f"BatchNorms left {batchnorm_nodes(proto)} (after residual sums: "
          f"{expected_batchnorms(model, x)}); parity max |logit difference| "
          f"{check.max_abs_diff:.2g}, top-1 agreement {check.top1_agreement:.0%}")
    print(f"int8: onnxruntime fp32 {ms['fp32']:.3f} ms, int8 {ms['int8']:.3f} ms, ratio "
          f"{ms['fp32'] / ms['int8']:.2f}x")
    print(f"export: torch eager {ms['torch']:.3f} ms, onnxruntime {ms['fp32']:.3f} ms, ratio "
          f"{ms['torch'] / ms['fp32']:.2f}x")
    return ms


if __name__ == "__main__":
    main(get_args_parser().parse_args())
