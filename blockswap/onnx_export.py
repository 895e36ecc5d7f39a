"""A network as an ONNX file, run in onnxruntime: export, checks, sessions, int8 quantisation.

The exporter is torch.onnx's default in torch 2.14 (dynamo=True: torch.export traces the network,
onnxscript translates and optimises the graph). It is the exporter torch maintains (the
TorchScript one, dynamo=False, is deprecated since torch 2.9 and warns on every call); its
optimiser folds each BatchNorm that directly follows a convolution into that convolution, which
`expected_batchnorms` checks against the network's own structure. It costs about a second per
export on a CPU (the TorchScript exporter: 0.03 s), which matters only for latency tables, and
those are measured once and cached (latency.py).

    proto = export_onnx(model, example)              # model: eval mode, returns logits
    session = make_session(proto, threads=1)
    logits = run_session(session, images)            # images: (N, 3, H, W) normalised
    check = parity(model, session, batches)          # max |logit diff|, top-1 agreement

Nothing here imports latency.py (latency.py imports this module for its onnxruntime runtime).
"""
import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from models.blocks import logits_of

INPUT, OUTPUT = "input", "logits"   # the names a deployment feeds and reads
EXPORTER = "torch.onnx (dynamo)"
PARITY_TOL = 1e-4     # max |logit difference| an fp32 export may show against eager torch
# Batch size of the example traced by the exporter: 2, not 1, since torch.export specialises
# a dimension whose example size is 1 and the batch dimension must stay dynamic.
EXAMPLE_BATCH = 2


class Logits(nn.Module):
    """The network as a deployment sees it: images in, logits out (our networks also return
    their group activations, for attention transfer; an export leaves them out)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return logits_of(self.net(x))


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The exporter and the quantiser report their progress on stdout and through warnings and
    logging (onnxruntime's on the root logger); a script prints its own summary, and a
    latency table exports hundreds of modules."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "")]   # "": onnxruntime's
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def export_onnx(module: nn.Module, example: torch.Tensor):
    """onnx.ModelProto of `module` (its first output if it returns several), in eval mode,
    on the CPU, with a dynamic batch dimension; onnx.checker passes on it. `module` is not
    changed (a network is exported as it is; its BatchNorms are folded in the graph)."""
    import onnx
    was_training = module.training
    wrapped = Logits(module).eval().cpu()
    example = example.cpu()[:1].expand(EXAMPLE_BATCH, *example.shape[1:]).contiguous()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        module.train(was_training)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto


def batchnorm_nodes(proto) -> int:
    """BatchNormalization nodes left in an exported graph."""
    return sum(node.op_type == "BatchNormalization" for node in proto.graph.node)


def opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


class _Uses(TorchFunctionMode):
    """Records every torch call of a forward that returns tensors: which call made each
    tensor, and how many calls read it (metadata calls such as x.dim() return no tensor and
    do not count)."""

    def __init__(self):
        super().__init__()
        self.maker: Dict[int, Callable] = {}
        self.reads: Dict[int, int] = {}
        self.batchnorm_inputs: List[torch.Tensor] = []
        self.keep: List = []      # holds every tensor, so no id() is reused during the trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outs:
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            for t in ins:
                self.reads[id(t)] = self.reads.get(id(t), 0) + 1
            for t in outs:
                self.maker[id(t)] = func
            if func is F.batch_norm:
                self.batchnorm_inputs.append(ins[0])
            self.keep.append((ins, outs))
        return out


@torch.no_grad()
def expected_batchnorms(module: nn.Module, example: torch.Tensor) -> int:
    """How many BatchNorms of `module` cannot be folded into a convolution: those whose input
    is not a convolution's output read by that BatchNorm alone (the pre-activation BNs after
    a residual sum, a BN fed by the network's input or by a pooling). Found by tracing one
    eval-mode forward, independently of any exporter."""
    was_training = module.training
    module.eval()
    uses = _Uses()
    try:
        with uses:
            module(example[:1])
    finally:
        module.train(was_training)
    convs = (F.conv1d, F.conv2d, F.conv3d)
    return sum(not (uses.maker.get(id(x)) in convs and uses.reads[id(x)] == 1)
               for x in uses.batchnorm_inputs)


# --------------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------------

def make_session(model, threads: Optional[int] = None):
    """An onnxruntime CPU session of `model` (a ModelProto, its bytes or a path) with
    `threads` intra-op threads (None: onnxruntime's own count) and one inter-op thread, as
    eager torch runs one operator at a time."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3   # errors only
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_session(session, x) -> np.ndarray:
    """The session's logits for a batch (a CPU torch tensor or a numpy array)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ort_callable(module: nn.Module, shape: Sequence[int],
                 threads: Optional[int] = None) -> Callable:
    """`module` exported (traced on inputs of `shape`, without the batch dimension) and loaded
    in onnxruntime, as a callable of a CPU torch tensor: what latency.py times."""
    proto = export_onnx(module, torch.randn(1, *shape))
    return session_callable(make_session(proto, threads))


def identity_callable(shape: Sequence[int], threads: Optional[int] = None) -> Callable:
    """An onnxruntime session of one Identity on inputs of `shape` (no batch dimension), as a
    callable: what one call costs beyond its operators (binding the input, allocating and
    handing back the output), for latency.py to count once per network, not once per block."""
    import onnx
    from onnx import TensorProto, helper
    dims = ["batch", *shape]
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT], [OUTPUT])], "identity",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, dims)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              ir_version=8)   # what every onnxruntime of opset 18 reads
    onnx.checker.check_model(proto)
    return session_callable(make_session(proto, threads))


def session_callable(session) -> Callable:
    """session as a callable of a CPU torch tensor, as eager torch is called (for timing:
    the tensor is handed over without a copy)."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def versions() -> Dict[str, str]:
    """The versions a file or a latency table depends on."""
    import onnx
    import onnxruntime
    import onnxscript
    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "exporter": EXPORTER}


# --------------------------------------------------------------------------------------------
# Checks on images
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parity:
    """How an export's logits compare with eager torch's on `images` images."""
    images: int
    max_abs_diff: float
    top1_agreement: float

    def passes(self, tol: float = PARITY_TOL) -> bool:
        return self.max_abs_diff <= tol and self.top1_agreement == 1.0


@torch.no_grad()
def parity(module: nn.Module, session, batches: Iterable[torch.Tensor]) -> Parity:
    """Eager `module` (eval mode) against the session, batch by batch."""
    was_training = module.training
    module.eval()
    n, worst, agree = 0, 0.0, 0
    try:
        for x in batches:
            ref = logits_of(module(x)).float().cpu().numpy()
            out = run_session(session, x)
            worst = max(worst, float(np.abs(out - ref).max()))
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            n += len(x)
    finally:
        module.train(was_training)
    return Parity(n, worst, agree / max(n, 1))


def accuracy(predict: Callable, batches: Iterable) -> float:
    """Top-1 accuracy of predict(images) -> logits over (images, labels) batches."""
    right = total = 0
    for x, y in batches:
        right += int((np.asarray(predict(x)).argmax(1) == np.asarray(y)).sum())
        total += len(y)
    return right / max(total, 1)


# --------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------

class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a list of image batches."""

    def __init__(self, name: str, batches: Sequence[torch.Tensor]):
        self.feeds = iter([{name: b.cpu().numpy()} for b in batches])

    def get_next(self):
        return next(self.feeds, None)


def quantise_int8(proto, calibration: Sequence[torch.Tensor]):
    """Static int8 quantisation in onnxruntime (QDQ format, per-channel int8 weights, int8
    activations, ranges by min-max over the calibration batches): the quantised ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process
    # onnxruntime's own default list, less the BatchNormalizations (those after a residual
    # sum): their 1-D weights have no output-channel axis to quantise per channel
    ops = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"BatchNormalization"})
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        # shape inference and graph clean-up first, as onnxruntime's quantisation guide asks
        with _quiet():
            quant_pre_process(src, pre)
            quantize_static(pre, out, _Calibration(INPUT, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=ops,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(out)
