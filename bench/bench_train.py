"""Training throughput (images/s) of main.py's train step on this machine; prints, no asserts.

    python bench/bench_train.py [--iters 3] [--batch 128] [--threads N] [--device cpu]

Each line times `iters` SGD steps on random 32x32 batches (after one warm-up step) through
main.train_one_epoch: teachers WRN-16-2 and WRN-40-2 (cross-entropy), and a WRN-16-2 student
of a WRN-40-2 teacher (attention transfer, teacher forward included).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as M  # noqa: E402
from funcs import pick_device  # noqa: E402


def steps_per_second(model, loss_fn, batches, rt):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    M.train_one_epoch(model, batches[:1], optimizer, scaler, rt, loss_fn)   # warm-up
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    M.train_one_epoch(model, batches, optimizer, scaler, rt, loss_fn)      # .tolist() syncs
    return len(batches) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--no_amp", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp = (torch.bfloat16 if device.type == "cuda" and not args.no_amp else None)
    rt = M.Runtime(device, amp_dtype=amp, channels_last=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(10, (args.batch,), generator=g)) for _ in range(args.iters)]
    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"{args.iters} timed steps after 1 warm-up, amp {amp}")

    fmt = torch.channels_last if rt.channels_last else torch.preserve_format
    torch.manual_seed(0)
    teacher40 = M.build_model("wrn", "Conv", 10, 40, 2).to(device, memory_format=fmt)
    for name, depth in (("WRN-16-2 teacher", 16), ("WRN-40-2 teacher", 40)):
        model = M.build_model("wrn", "Conv", 10, depth, 2).to(device, memory_format=fmt)
        sps = steps_per_second(model, M.teacher_loss_fn, batches, rt)
        print(f"{name:<32} {sps * args.batch:8.1f} img/s  ({1 / sps:.2f} s/step)")
    teacher40.eval().requires_grad_(False)
    student = M.build_model("wrn", "Conv", 10, 16, 2).to(device, memory_format=fmt)
    loss_fn = M.make_student_loss_fn(teacher40, 0.0, 4.0, 1e3)
    sps = steps_per_second(student, loss_fn, batches, rt)
    print(f"{'WRN-16-2 student of WRN-40-2':<32} {sps * args.batch:8.1f} img/s  ({1 / sps:.2f} s/step)")


if __name__ == "__main__":
    main()
