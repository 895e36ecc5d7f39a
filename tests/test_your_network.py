"""Your own network on your own images (docs/your-network.md): the `folder` data set, weights
from a file (--init_weights, --teacher_weights, --inherit), attention transfer by forward hooks,
the teacher's validation error measured once, and export of such a checkpoint. Weights files are
made with torchvision's constructors (random init) and saved, as a user's file would be; images
are small (32-40 px) so every run takes seconds."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision

import main as M
from blockswap import build as B
from blockswap import engine as E
from blockswap import loaders as L
from blockswap.cli import run_cli
from blockswap.distill import Taps, distill_loss
from blockswap.files import save_genotype
from blockswap.runtime import Runtime
from models import Network


def write_folder(root, classes, per_class=(3, 2), side=40, seed=0):
    """train/ and val/ folders of `classes` classes (named c0, c1, ...), `side`-pixel square
    PNGs whose colour depends on the class, so a network can learn them."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 50, size=(side, side, 3), dtype=np.uint8)
                img[..., c % 3] += np.uint8(40 + 25 * c)
                Image.fromarray(img).save(os.path.join(root, split, f"c{c}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("five"), 5)


def argv(data, ckdir, *extra):
    return ["folder", "--data_loc", data, "--checkpoint_dir", str(ckdir), "--image_size", "32",
            "--batch_size", "5", "--workers", "0", "--epochs", "1", "--no-plot", *extra]


def run(data, ckdir, *extra):
    return M.main(M.get_args_parser().parse_args(argv(data, ckdir, *extra)))


def one_line_error(capsys, data, ckdir, *extra) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(M.main, M.get_args_parser(), argv(data, ckdir, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def save_state(path, model):
    torch.save(model.state_dict(), path)
    return str(path)


# --------------------------------------------------------------------------------------------
# The folder data set
# --------------------------------------------------------------------------------------------

def folder_loaders(data, loader, *extra):
    cfg = E.TrainConfig.from_args(M.get_args_parser().parse_args(
        ["folder", "teacher", "--data_loc", data, "--workers", "0", "--batch_size", "4",
         "--loader", loader, *extra]))
    return L.make_loaders(cfg, Runtime(torch.device("cpu")))


@pytest.mark.parametrize("classes, flags, recipe, side", [
    (3, ["--arch", "mobilenet_v2", "--image_size", "32"], "imagenet", 32),   # 224-px family
    (7, [], "cifar", 32)])                                                   # WRN's default
def test_folder_reads_its_classes_and_says_which_path(classes, flags, recipe, side, tmp_path,
                                                      monkeypatch, capsys):
    """The class count is the folder's; auto takes the tensor path when the decoded images fit
    (else pil, and says so); both paths give the same validation images (square images:
    resize then centre crop either way) and training batches of the network's size."""
    data = write_folder(tmp_path / "d", classes)
    train, val, n = folder_loaders(data, "auto", *flags)
    line = capsys.readouterr().out
    assert n == classes and f"{classes} classes" in line and "tensor path" in line, line
    assert f"{side} px, {recipe} recipe" in line
    monkeypatch.setattr(L, "TENSOR_MAX_BYTES", 1)   # nothing fits: the PIL path
    pil_train, pil_val, n = folder_loaders(data, "auto", *flags)
    assert "pil path" in capsys.readouterr().out and n == classes
    for a, b in zip(val, pil_val):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
        assert torch.equal(a[1], b[1])
    x, y = next(iter(train))
    assert x.shape == (4, 3, side, side) and next(iter(pil_train))[0].shape == x.shape
    assert int(y.max()) < classes


def test_resized_crop_against_slicing():
    """ResizedCrop (the tensor path's RandomResizedCrop): a box of the output's size is
    exactly that slice of the image (mirrored when flipped); every drawn box lies in the image
    with torchvision's area and aspect bounds (up to the rounding of its sides)."""
    from blockswap.tensor_data import ResizedCrop, resized_crop
    x = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8)
    box = torch.tensor([[3, 5], [2, 0], [32, 32], [32, 32], [0, 1]])   # top, left, h, w, flip
    out = resized_crop(x, box, 32)
    torch.testing.assert_close(out[0], x[0, :, 3:35, 2:34].float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(out[1], x[1, :, 5:37, 0:32].float().flip(-1), rtol=0, atol=1e-2)
    top, left, h, w, flip, _, _ = ResizedCrop((0, 0, 0), (1, 1, 1), size=32).draw(
        4000, 37, 37, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 37).all() \
        and (left + w <= 37).all() and set(flip.tolist()) == {0, 1}
    area, ratio = (h * w).double() / 37 ** 2, w.double() / h
    assert area.min() >= 0.06 and area.max() <= 1 and ratio.min() >= 0.7 and ratio.max() <= 1.43
    # the same distribution as torchvision's own draw (its mean area and aspect)
    torch.manual_seed(0)
    tv = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(
        torch.zeros(3, 37, 37), (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(4000)]).double()
    assert area.mean() == pytest.approx((tv[:, 0] * tv[:, 1]).mean() / 37 ** 2, abs=0.02)
    assert ratio.mean() == pytest.approx((tv[:, 1] / tv[:, 0]).mean(), abs=0.02)


# --------------------------------------------------------------------------------------------
# Weights from a file
# --------------------------------------------------------------------------------------------

def test_init_weights_fine_tunes_a_1000_class_file_on_five_classes(five, tmp_path, capsys):
    """--init_weights with a torchvision ResNet's 1000-class file on a 5-class folder: one line
    says the classifier starts afresh; every other tensor is the file's (checked on the
    library call, before training moves them)."""
    torch.manual_seed(0)
    path = save_state(tmp_path / "r18.pth", torchvision.models.resnet18())
    run(five, tmp_path, "teacher", "--arch", "tv_resnet18", "--init_weights", path, "-t", "t")
    out = capsys.readouterr().out
    assert "its classifier has 1000 classes, folder has 5: fc.weight, fc.bias start afresh" \
        in out, out
    assert torch.load(tmp_path / "t.t7", weights_only=True)["num_classes"] == 5
    cfg = E.TrainConfig(dataset="folder", arch="tv_resnet18", init_weights=path)
    model, fresh = (Network("tv_resnet18", num_classes=5).build() for _ in range(2))
    fresh.load_state_dict(model.state_dict())
    B.initial_weights(model, cfg, None, say=lambda *a: None)
    file = torch.load(path, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k] if k.startswith("fc.") else file[k]), k


def test_init_weights_that_do_not_fit_are_one_line(five, tmp_path, capsys):
    """Another family's file, or one tensor of another shape: one line naming the first
    differing key, exit 2, nothing written."""
    wrong = save_state(tmp_path / "mbv2.pth", torchvision.models.mobilenet_v2(num_classes=5))
    err = one_line_error(capsys, five, tmp_path / "ck", "teacher", "--arch", "tv_resnet18",
                         "--init_weights", wrong, "-t", "t")
    assert "does not fit tv_resnet18: conv1.weight is missing from the file" in err, err
    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(state, tmp_path / "bent.pth")
    err = one_line_error(capsys, five, tmp_path / "ck", "teacher", "--arch", "tv_resnet18",
                         "--init_weights", str(tmp_path / "bent.pth"), "-t", "t")
    assert "layer2.0.conv1.weight is [128, 64, 1, 1] in the file, [128, 64, 3, 3]" in err, err
    assert not os.path.exists(tmp_path / "ck" / "t.t7")


def test_weights_file_forms_and_a_foreign_file(tmp_path):
    """A state dict alone, under 'state_dict' or 'model', with DataParallel's prefix, or one
    of our checkpoints all read the same; a file without one is one clear error."""
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    forms = {"plain": state, "wrapped": {"state_dict": state, "epoch": 3},
             "model": {"model": {f"module.{k}": v for k, v in state.items()}},
             "another code's 'net'": {"net": state, "acc": 0.5}}   # not one of our checkpoints
    for name, saved in forms.items():
        torch.save(saved, tmp_path / name)
        got, ckpt = B.read_weights(str(tmp_path / name), "--init_weights")
        assert ckpt is None and list(got) == list(state), name
        assert all(torch.equal(got[k], v) for k, v in state.items())
    torch.save({"epoch": 3}, tmp_path / "none")
    with pytest.raises(B.UserError, match="holds no state dict"):
        B.read_weights(str(tmp_path / "none"), "--init_weights")


def mixed_genotype():
    """A MobileNetV2 student that changes some blocks' expansion and kernel."""
    return ["MB1K3"] + ["MB3K5", "MB6K3", "MB6K7", "MB1K3"] * 4


@pytest.fixture(scope="module")
def student(five, tmp_path_factory):
    """(folder, printed text, teacher): a MobileNetV2 student of `mixed_genotype` trained one
    epoch with --teacher_weights (a torchvision file, 5 classes) and --inherit."""
    folder = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    teacher = torchvision.models.mobilenet_v2(num_classes=5)
    path = save_state(folder / "teacher.pth", teacher)
    save_genotype(str(folder / "g.csv"), mixed_genotype())
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        run(five, folder, "student", "--arch", "mobilenet_v2", "--teacher_weights", path,
            "--from_genotype", str(folder / "g.csv"), "-s", "s", "--inherit", "--lr", "0.01")
    return folder, capture.getvalue(), teacher


def test_student_from_teacher_weights_inherits_what_keeps_its_shape(student):
    """--teacher_weights: a torchvision MobileNetV2 file is the frozen teacher (no checkpoint
    of ours); --inherit copies every teacher tensor whose name and shape the student shares:
    the count printed equals an independent comparison of the two state dicts' shapes, and
    those tensors are the teacher's."""
    folder, out, teacher = student
    model = Network("mobilenet_v2", num_classes=5).build(mixed_genotype())
    theirs = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    same = sum(theirs.get(k) == shape for k, shape in mine.items())
    assert 0 < same < len(mine)
    assert f"--inherit: {same} of the student's {len(mine)} tensors" in out, out
    assert B.inherit(model, teacher) == (same, len(mine))
    for k, v in model.state_dict().items():
        if theirs.get(k) == tuple(v.shape):
            assert torch.equal(v, teacher.state_dict()[k]), k
    ckpt = torch.load(folder / "s.t7", weights_only=True)
    assert ckpt["convs"] == mixed_genotype() and ckpt["teacher_val_error"] is not None
    assert ckpt["args"]["teacher_weights"] == str(folder / "teacher.pth")


def test_teacher_file_of_another_class_count_is_one_line(five, tmp_path, capsys):
    path = save_state(tmp_path / "t.pth", torchvision.models.mobilenet_v2())
    err = one_line_error(capsys, five, tmp_path, "student", "--arch", "mobilenet_v2",
                         "--teacher_weights", path, "-s", "s")
    assert "has 1000 classes but folder" in err and "--init_weights" in err, err


def test_mode_flags_are_refused_in_the_other_mode(five, tmp_path, capsys):
    err = one_line_error(capsys, five, tmp_path, "teacher", "--inherit", "-t", "t")
    assert "--inherit starts a student" in err


# --------------------------------------------------------------------------------------------
# The teacher's validation error, measured once
# --------------------------------------------------------------------------------------------

WRN = ("--arch", "wrn", "--wrn_depth", "10", "--wrn_width", "1")


@pytest.fixture(scope="module")
def wrn_teacher(five, tmp_path_factory):
    """A folder holding `t`, a WRN-10-1 teacher of the five-class folder (one epoch)."""
    folder = tmp_path_factory.mktemp("wrn")
    run(five, folder, "teacher", *WRN, "-t", "t")
    return folder


def test_teacher_error_is_measured_once(five, wrn_teacher, tmp_path, monkeypatch, capsys):
    """A student of our teacher checkpoint takes the teacher's recorded error (validated on the
    same images); a resumed student keeps its own copy: only the student is validated."""
    (tmp_path / "t.t7").write_bytes((wrn_teacher / "t.t7").read_bytes())
    recorded = torch.load(tmp_path / "t.t7", weights_only=True)["val_error"]
    calls = []
    real = E.validate
    monkeypatch.setattr(E, "validate", lambda model, *a: calls.append(model) or real(model, *a))
    run(five, tmp_path, "student", "-t", "t", "-s", "s", "--conv", "DConvA2")
    run(five, tmp_path, "student", "-t", "t", "-s", "s", "--conv", "DConvA2", "--resume",
        "--epochs", "2")
    assert len(calls) == 2 and all(m.genotype == ["DConvA2"] * 3 for m in calls)
    out = capsys.readouterr().out
    assert out.count(f"val error {recorded:.2f}%") == 2, out
    assert torch.load(tmp_path / "s.t7", weights_only=True)["teacher_val_error"] == recorded
    calls.clear()   # validated on other images (a subset): measured, once
    run(five, tmp_path, "student", "-t", "t", "-s", "s2", "--conv", "DConvA2",
        "--val_subset", "4")
    assert [m.genotype[0] for m in calls] == ["Conv", "DConvA2"]


# --------------------------------------------------------------------------------------------
# Attention transfer by forward hooks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("net", [Network("wrn", 16, 1, 10), Network("resnet18", num_classes=10)])
def test_hooked_attention_transfer_equals_the_returned_activations(net):
    """For our own families (whose forward also returns the stage outputs) the hooks at
    Network.taps catch exactly those tensors, so every distillation loss is unchanged."""
    torch.manual_seed(0)
    teacher, student = net.build(), net.build("DConvA2")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    hooked_s, hooked_t = Taps.of(student)(student, x), Taps.of(teacher)(teacher, x)
    returned_s, returned_t = student(x), teacher(x)
    for hooked, returned in ((hooked_s, returned_s), (hooked_t, returned_t)):
        assert torch.equal(hooked[0], returned[0]) and len(hooked[1]) == len(returned[1])
        assert all(torch.equal(a, b) for a, b in zip(hooked[1], returned[1]))
    hp = E.TrainConfig(alpha=0.9)
    assert torch.equal(distill_loss(["at", "kd"], hooked_s, hooked_t, y, hp),
                       distill_loss(["at", "kd"], returned_s, returned_t, y, hp))


def test_taps_keep_nothing_between_calls():
    model = Network("mobilenet_v2", num_classes=3).build()
    taps = Taps.of(model)
    logits, acts = taps(model, torch.randn(2, 3, 32, 32))
    sides = [a.shape[-1] for a in acts]
    assert len(acts) == len(Network.of(model).taps) and sides == sorted(sides, reverse=True)
    model(torch.randn(2, 3, 32, 32))   # a plain call: the hooks keep nothing
    assert taps.caught == {}


# --------------------------------------------------------------------------------------------
# Export of a folder checkpoint
# --------------------------------------------------------------------------------------------

def test_export_of_a_folder_checkpoint_states_size_and_normalisation(wrn_teacher):
    """A folder checkpoint exported: parity on the folder's images, BatchNorms folded as far
    as they can be, and the JSON says the image size, the steps and the normalisation (WRN on
    a folder: CIFAR's recipe at 32 pixels, ImageNet's statistics)."""
    import export as X
    checks = X.main(X.get_args_parser().parse_args(
        [str(wrn_teacher / "t.t7"), "--parity", "10", "--repeats", "1", "--batch", "2",
         "--threads", "1"]))
    meta = json.loads((wrn_teacher / "t.json").read_text())
    assert checks["parity"]["max_abs_diff"] <= 1e-4 and checks["parity"]["images"] == 10
    assert checks["batchnorms"]["left"] == checks["batchnorms"]["expected"]
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["input"]["image_size"] == 32
    pre = meta["input"]["preprocessing"]
    assert pre["mean"] == list(L.IMAGENET_STATS[0]) and pre["std"] == list(L.IMAGENET_STATS[1])
    assert pre["steps"][:2] == ["Resize(size=32, interpolation=bilinear, max_size=None, "
                                "antialias=True)", "CenterCrop(size=(32, 32))"]
    assert meta["dataset"] == "folder" and meta["classes"] == [f"c{i}" for i in range(5)]


@pytest.mark.slow
def test_mobilenet_v2_search_rerank_student_and_export(five, student, tmp_path):
    """The worked path of docs/your-network.md on tiny images: a MobileNetV2 search on the
    folder, its re-rank, a student of the best genotype with --teacher_weights, exported with
    int8 (the JSON: 32 pixels, ImageNet's recipe and statistics)."""
    import export as X
    import fisher_rank as F
    teacher = str(student[0] / "teacher.pth")
    F.main(F.get_args_parser().parse_args(
        ["folder", "--data_loc", five, "--arch", "mobilenet_v2", "--image_size", "32",
         "--param_goal", "1500000", "--tol", "0.1", "--samples", "4", "--batch_size", "8",
         "--save_file", "none", "--results_dir", str(tmp_path / "results"),
         "--genotype_dir", str(tmp_path / "genotypes"), "--rerank", "2", "--rerank_epochs", "1",
         "--workers", "0", "--no-plot"]))
    best, = (tmp_path / "genotypes").glob("mobilenet_v2_1500000_rerank_*.csv")   # its index
    run(five, tmp_path, "student", "--arch", "mobilenet_v2", "--teacher_weights", teacher,
        "--from_genotype", str(best), "-s", "small", "--lr", "0.01")
    checks = X.main(X.get_args_parser().parse_args(
        [str(tmp_path / "small.t7"), "--parity", "10", "--repeats", "1", "--batch", "2",
         "--int8", "--calib", "8", "--val", "10", "--threads", "1"]))
    meta = json.loads((tmp_path / "small.json").read_text())
    assert checks["parity"]["max_abs_diff"] <= 1e-4 and checks["batchnorms"]["left"] == 0
    assert meta["input"]["image_size"] == 32 and meta["int8"]["images"] == 10
    assert meta["input"]["preprocessing"]["steps"][:2] == [
        "Resize(size=37, interpolation=bilinear, max_size=None, antialias=True)",
        "CenterCrop(size=(32, 32))"]
    assert meta["input"]["preprocessing"]["mean"] == list(L.IMAGENET_STATS[0])
