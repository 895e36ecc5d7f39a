"""The device check's first step (bench/device_check.py), about 30 seconds: the versions of
what is installed, then one training step of a WRN-16-2 and one Fisher potential on the device,
through the project's own code, as a study's worker runs them. Anything that fails ends the
check with one line, naming the API when the installed torch lacks one the project uses.

    python bench/device_smoke.py [--device cuda]      # cpu: the same code on a CPU (QUICK=1)
"""
import argparse
import importlib.metadata
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pillow", "matplotlib", "tqdm", "pytest",
            "onnxruntime", "scipy", "submitit")   # submitit: only --launcher slurm needs it


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p


def versions() -> str:
    """One line: Python and each installed package's version (read from its metadata, without
    importing it), 'absent' for those not installed."""
    found = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def device_line(device) -> str:
    import torch
    if device.type != "cuda":
        return f"device: cpu, {torch.get_num_threads()} torch threads"
    p = torch.cuda.get_device_properties(device)
    return (f"device: {p.name}, compute capability {p.major}.{p.minor}, "
            f"{p.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, "
            f"{torch.cuda.device_count()} visible")


def training_step(device) -> str:
    """One SGD step of a WRN-16-2 at the device's default precision (engine.train_one_epoch)."""
    import torch
    from blockswap import engine
    from blockswap.runtime import Runtime, resolve_precision
    from models import Network
    amp, channels_last = resolve_precision(device, "auto")
    rt = Runtime(device, amp_dtype=amp, channels_last=channels_last)
    torch.manual_seed(0)
    model = rt.place(Network("wrn", 16, 2, 10).build())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(10, (64,), generator=g))
    loss, _ = engine.train_one_epoch(model, [batch], opt, rt.grad_scaler(), rt,
                                     engine.teacher_loss_fn)
    if not math.isfinite(loss):
        raise RuntimeError(f"the training step's loss is {loss}")
    return f"training step: WRN-16-2, {rt.precision()}, loss {loss:.4f}"


def fisher_score(device) -> str:
    """The Fisher potential of one random WRN-16-2 candidate on the device and on the CPU."""
    import torch
    from blockswap.proxies import get_proxy
    from models import Network
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(10, (32,), generator=g)
    torch.manual_seed(0)
    net = Network("wrn", 16, 2, 10).build(["Conv", "DConvA2", "G4B2", "ConvB2", "DConvG4",
                                           "A4B2"])
    on_cpu = get_proxy("fisher")(net, x, y)
    here = get_proxy("fisher")(net.to(device), x.to(device), y.to(device))
    if not math.isfinite(here):
        raise RuntimeError(f"the Fisher potential is {here}")
    return (f"Fisher potential: {here:.6g} on {device.type}, {on_cpu:.6g} on cpu "
            f"(relative difference {abs(here - on_cpu) / abs(on_cpu):.1e})")


def failure(e: BaseException) -> str:
    """The one line of a failed smoke: an API this torch lacks is named as such."""
    import torch
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    missing = isinstance(e, (AttributeError, ImportError)) or (
        isinstance(e, TypeError) and "unexpected keyword" in str(e))
    if missing:
        return (f"smoke failed: {text} (an API that torch {torch.__version__} lacks or spells "
                "otherwise; the project was written on torch 2.14)")
    return f"smoke failed: {text}"


def main(args) -> int:
    start = time.perf_counter()
    print(f"versions: {versions()}", flush=True)
    try:
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        device = torch.device(args.device)
        for step in (device_line, training_step, fisher_score):
            print(step(device), flush=True)
    except Exception as e:
        print(failure(e), flush=True)
        return 1
    print(f"smoke: ok in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
