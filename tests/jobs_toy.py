"""Job functions for tests/test_jobs.py: top-level in a small module, so the worker processes
of the local and slurm launchers import them cheaply (tests/ is on their import path)."""
import os
import sys
import time

import torch


def _note_call(payload, name):
    """Append the job's name to payload['calls'] (a file), so a test sees which jobs ran."""
    if payload.get("calls"):
        with open(payload["calls"], "a") as f:
            f.write(name + "\n")


def train_toy(payload):
    """A few SGD steps of a tiny MLP on data drawn from the payload's seed: the same numbers
    wherever it runs, given the same thread count."""
    _note_call(payload, payload["name"])
    if payload.get("interrupt_if") and os.path.exists(payload["interrupt_if"]):
        raise KeyboardInterrupt   # a kill in the middle of the run
    gen = torch.Generator().manual_seed(payload["seed"])
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    torch.manual_seed(payload["seed"])
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(payload.get("steps", 5)):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"toy {payload['name']}: loss {loss.item():.6f}")
    weight_sum = float(sum(p.detach().sum() for p in net.parameters()))
    return {"loss": loss.item(), "weight_sum": weight_sum,
            "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}


def fail_or_echo(payload):
    """Prints a line, then raises when payload['fail'] is set, else returns the payload."""
    print(f"hello from {payload['name']}")
    sys.stdout.flush()
    if payload.get("fail"):
        raise RuntimeError(f"job {payload['name']} was told to fail")
    return {"echo": payload["name"], "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS")}


def sleep_job(payload):
    """Write this process's pid to <pid_dir>/<name>.pid, then sleep."""
    with open(os.path.join(payload["pid_dir"], payload["name"] + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(payload["seconds"])
    return {}
