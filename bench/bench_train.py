"""Training throughput (images/s) of main.py's train step: fp32 NCHW against the default
precision (--amp auto) on this machine; prints, no asserts.

    nice python bench/bench_train.py [--iters 3] [--rounds 3] [--batch 128] [--threads N]
                                     [--device cpu] [--quick]

--quick: a smoke test in seconds (1 round of 1 step at batch 8).

For the WRN-16-2 and WRN-40-2 teachers (cross-entropy) and a WRN-16-2 student of a WRN-40-2
teacher (attention transfer, teacher forward included), the two settings are timed in turns
(`rounds` x `iters` SGD steps each on random 32x32 batches, after one warm-up step), so a load
that comes and goes hits both alike. Last line (WRN-16-2 teacher):
`<device>: fp32 <a> img/s, default <b> img/s, ratio <r>x`.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockswap import engine as E  # noqa: E402
from blockswap.distill import resolve_distill  # noqa: E402
from models import Network  # noqa: E402
from blockswap.runtime import Runtime, pick_device, resolve_precision  # noqa: E402


def timed_steps(model, loss_fn, batches, rt, optimizer, scaler):
    """Seconds for one pass over `batches` through engine.train_one_epoch (its .tolist() syncs)."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    start = time.perf_counter()
    E.train_one_epoch(model, batches, optimizer, scaler, rt, loss_fn)
    return time.perf_counter() - start


def compare(make_model, make_loss, batches, runtimes, rounds):
    """{name: images/s} of each runtime, timed in turns on identically initialised models."""
    setups = {}
    for name, rt in runtimes.items():
        torch.manual_seed(0)
        model = rt.place(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        setups[name] = (model, make_loss(rt), rt, optimizer, rt.grad_scaler())
        timed_steps(model, setups[name][1], batches[:1], rt, optimizer, setups[name][4])  # warm-up
    seconds = {name: 0.0 for name in runtimes}
    for _ in range(rounds):
        for name, (model, loss_fn, rt, optimizer, scaler) in setups.items():
            seconds[name] += timed_steps(model, loss_fn, batches, rt, optimizer, scaler)
    images = rounds * sum(len(t) for t, _ in batches)
    return {name: images / s for name, s in seconds.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 1 step at batch 8")
    args = p.parse_args()
    if args.quick:
        args.iters, args.rounds, args.batch = 1, 1, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp, channels_last = resolve_precision(device, "auto")
    runtimes = {"fp32": Runtime(device),
                "default": Runtime(device, amp_dtype=amp, channels_last=channels_last)}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(10, (args.batch,), generator=g)) for _ in range(args.iters)]
    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"{args.rounds} rounds x {args.iters} steps per setting; fp32 = fp32, NCHW; "
          f"default = {runtimes['default'].precision()}")

    student_cfg = resolve_distill(E.TrainConfig(mode="student"), None)   # AT, main's defaults

    def teacher40():
        torch.manual_seed(1)
        return Network("wrn", 40, 2, 10).build().eval().requires_grad_(False)
    cases = [("WRN-16-2 teacher", lambda: Network("wrn", 16, 2, 10).build(),
              lambda rt: E.teacher_loss_fn),
             ("WRN-40-2 teacher", lambda: Network("wrn", 40, 2, 10).build(),
              lambda rt: E.teacher_loss_fn),
             ("WRN-16-2 student of WRN-40-2", lambda: Network("wrn", 16, 2, 10).build(),
              lambda rt: E.make_student_loss_fn(rt.place(teacher40()), student_cfg))]
    first = None
    for name, make_model, make_loss in cases:
        speed = compare(make_model, make_loss, batches, runtimes, args.rounds)
        first = first or speed
        print(f"{name:<30} fp32 {speed['fp32']:8.1f} img/s  default {speed['default']:8.1f} "
              f"img/s  ({speed['default'] / speed['fp32']:.2f}x)", flush=True)
    print(f"{device.type}: fp32 {first['fp32']:.0f} img/s, default {first['default']:.0f} img/s, "
          f"ratio {first['default'] / first['fp32']:.2f}x")


if __name__ == "__main__":
    main()
