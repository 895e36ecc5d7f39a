"""Shared fixtures: tiny generated datasets in the layouts the real loaders read."""
import os
import pickle
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _images(n, seed):
    """n random 32x32 RGB images whose colour depends on the label, so a net can learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    imgs = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
    imgs[..., 0] += (labels * 19).astype(np.uint8)[:, None, None]
    return imgs, labels


def write_imagefolder(root, n_train=40, n_test=20, ext="png"):
    from PIL import Image
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        imgs, labels = _images(n, seed)
        for i, (img, y) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, CLASSES[y])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:04d}.{ext}"))
    return str(root)


def write_cifar10_batches(root, n_train=20, n_test=10):
    """torchvision's cifar-10-batches-py layout (data_batch_1..5, test_batch, batches.meta)."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else n_train // 5
        imgs, labels = _images(n, k)
        entry = {"data": imgs.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels.tolist()}
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return str(root)


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """Decoded-data caches (loaders.py) go to a temporary $XDG_CACHE_HOME, also for the
    subprocesses the tests start, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """train/<class>/*.png (40 images) and test/<class>/*.png (20 images)."""
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    return write_cifar10_batches(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def cifar_no_md5(monkeypatch):
    """Our generated pickles are not the real files: skip torchvision's md5 check only."""
    import torchvision.datasets.cifar as C
    monkeypatch.setattr(C, "check_integrity", lambda path, md5=None: os.path.isfile(path))


REPO_OUTPUTS = ("archs", "checkpoints", "genotypes", "results")


def _repo_outputs():
    """{path: (size, mtime)} of every file under the repository's output folders."""
    out = {}
    for top in REPO_OUTPUTS:
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                p = os.path.join(d, n)
                out[os.path.relpath(p, ROOT)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


@pytest.fixture(scope="session", autouse=True)
def repo_outputs_untouched():
    """Tests write only under tmp_path: the repository's archs/, checkpoints/, genotypes/ and
    results/ are the same after the session as before it."""
    before = _repo_outputs()
    yield
    after = _repo_outputs()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the repository: {changed}"


def killed_in_epoch(monkeypatch, epoch, run):
    """Call run() with engine.train_one_epoch raising KeyboardInterrupt as epoch `epoch` starts
    (a kill mid-run, for the resume tests); engine.train_one_epoch is restored afterwards."""
    from blockswap import engine
    real, calls = engine.train_one_epoch, []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(engine, "train_one_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(engine, "train_one_epoch", real)


# --------------------------------------------------------------------------------------------
# Running the scripts, and the one-line error contract (every test file uses these)
# --------------------------------------------------------------------------------------------

def run(script, *argv):
    """A script's entry point on a command line, as a user would call it but in this process:
    `run(fisher_rank, "cifar10", "--data_loc", data)`. Errors propagate (no run_cli)."""
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def snapshot(folder):
    """{relative path: (bytes, mode)} of every file under a folder (to show nothing changed)."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (fh.read(), os.stat(p).st_mode)
    return out


def one_error_line(capsys, call, folder=None, match=None):
    """call() ends as exit 2 with exactly one `error: ...` line on stderr (naming `match` if
    given) and nothing under `folder` created or changed. Returns that line."""
    before = snapshot(folder) if folder else None
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if match is not None:
        assert match in err, err
    if folder:
        assert snapshot(folder) == before
    return err


def study_argv(folder, data, *extra):
    return ["cifar10", "--data_loc", data, "--wrn_depth", "10", "--wrn_width", "1",
            "--candidates", "3", "--epochs", "1", "--batch_size", "8", "--train_subset", "16",
            "--val_subset", "10", "--proxies", "params,fisher", "--out", str(folder), *extra]
