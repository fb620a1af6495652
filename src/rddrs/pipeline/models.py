"""Base classifiers, and loading trained ones from disk.

``MnistCNN`` is the paper's base classifier: two 5x5 convolutions with 16 and 32 channels,
each followed by ReLU and 2x2 max-pooling, then one linear layer to 10 logits. Input:
N x 1 x 28 x 28 images in [0, 1] (MNIST or Fashion-MNIST).

``load_model`` turns a file into a frozen classifier ``N x 1 x 28 x 28 -> N x 10 logits``
(eval mode, parameters without gradients, input gradients flowing). It reads two formats:

- our checkpoints ``X.pt`` (``torch.load(X, weights_only=True)``): a dict with ``state_dict``,
  ``arch`` (a name in ``ARCHITECTURES``) and optional ``arch_kwargs``; a bare state dict works
  too when the JSON sidecar ``X.json`` names the architecture (key ``arch``);
- any ``torch.export`` program (``.pt2``, written by ``torch.export.save``), which loads with
  ``torch.export.load(X).module()`` without the model's Python class.

Which format a file is in is read from its content, not from its suffix. ``trained_on`` reads
the dataset a model was trained on from its record ``X.json``.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from rddrs import RDDRSError
from rddrs.pipeline.data import MNIST
from rddrs.pipeline.fastnet import fast
from rddrs.pipeline.files import one_line, regular_file


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# architecture name (as stored in checkpoints and sidecars) -> class
ARCHITECTURES: dict[str, type[nn.Module]] = {"MnistCNN": MnistCNN}


class ExportedModel(nn.Module):
    """A loaded ``torch.export`` program as an ordinary module.

    The program's graph is frozen in the mode it was exported in (eval for ours), and the
    module that ``ExportedProgram.module()`` returns refuses ``.eval()``/``.train()``. This
    wrapper accepts ``.eval()`` (a no-op) so callers can treat every loaded model alike, and
    refuses ``.train()``.
    """

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedModel:
        if mode:
            raise RDDRSError("a torch.export program is frozen in eval mode and cannot be put in training mode")
        self.training = False
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


class LogOutputs(nn.Module):
    """``log f(x)`` for a model ``f`` whose outputs are class probabilities.

    Log-probabilities serve as logits: ``softmax(log p) = p / sum(p)`` and ``argmax`` is
    unchanged. Probabilities are floored at the smallest positive normal number of their
    dtype first, so a zero gives a large negative finite logit and finite gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        p = self.model(x)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device`` for a name such as ``cpu``, ``cuda``, ``cuda:1``; RDDRSError if the
    name is invalid or CUDA was asked for but is not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise RDDRSError(f"invalid device {device!r} ({one_line(err)}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RDDRSError(
                f"device {device!r} was asked for but CUDA is not available "
                f"(torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RDDRSError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type != "cpu":
        raise RDDRSError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def load_model(path: str | Path, device: str | torch.device = "cpu", probabilities: bool = False) -> nn.Module:
    """Load a classifier for ``N x 1 x 28 x 28`` inputs in [0, 1] that returns ``N x 10`` logits.

    ``path`` is one of our ``.pt`` checkpoints or any ``torch.export`` program (``.pt2``).
    The model is moved to ``device``, put in eval mode, and its parameters get
    ``requires_grad=False`` (gradients with respect to the input still flow).
    A model of the project's CNN family on the CPU comes back as ``fastnet.FastCNN`` (the same
    logits, a faster input gradient) unless ``RDDRS_FAST_NETWORK=0``.
    ``probabilities=True`` declares that the file's model outputs probabilities; it is then
    wrapped to return their logarithm (see ``LogOutputs``). Any problem with the file
    raises a one-line ``RDDRSError``.
    """
    path = regular_file(Path(path), "model")
    dev = resolve_device(device)
    if _is_export_archive(path):
        model = _load_program(path, dev)
    else:
        model = _load_checkpoint(path, dev)
    model.requires_grad_(False)
    model = fast(model.eval())  # the project's CNN family on the CPU: rddrs.pipeline.fastnet
    if probabilities:
        model = LogOutputs(model)
    return model.eval()


def _is_export_archive(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (a zip with an ``archive_format``
    entry; ``torch.save`` zips hold ``data.pkl`` instead)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.split("/")[-1] == "archive_format" for name in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


#: what every model must take: a batch of images of the datasets (all 1 x 28 x 28)
INPUT_SHAPE = MNIST.input_shape
#: and what it must give for each: one logit (or probability) per class (10 in every dataset)
CLASSES = len(MNIST.classes)


def trained_on(path: str | Path) -> str | None:
    """The dataset the model ``path`` was trained on, from its record ``X.json`` (written by ``rddrs
    train``, naming the architecture; a record from before datasets were recorded says mnist), or
    None for a model without such a record (a torch.export program from elsewhere); a record that
    cannot be read is a one-line error."""
    record = Path(path).with_suffix(".json")
    if not record.is_file():
        return None
    try:
        meta = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RDDRSError(f"cannot read the record {record} of the model {path} ({one_line(err)})") from None
    if not (isinstance(meta, dict) and "arch" in meta):
        return None  # not a record of ours
    return str(meta.get("dataset", MNIST.name))


def check_outputs(model: nn.Module, x: Tensor, name: str | Path, classes: int = CLASSES) -> None:
    """A one-line error unless ``model`` (read from ``name``) maps the images ``x`` to an
    ``N x classes`` tensor of finite floating-point numbers: a model with other outputs would certify wrongly
    (a NaN is the largest value to argmax, a single output always class 0)."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # whatever the model raises, the file is not usable
        raise RDDRSError(f"{name} does not run on {len(x)} test images ({one_line(err, 200)})") from None
    if not isinstance(out, Tensor):
        raise RDDRSError(f"{name} returns a {type(out).__name__}, not a tensor of N x {classes} logits")
    if out.ndim != 2 or out.shape[0] != len(x) or out.shape[1] != classes:
        shape = " x ".join(map(str, out.shape)) or "a scalar"
        raise RDDRSError(
            f"{name} gives outputs of shape {shape} for {len(x)} image{'s' * (len(x) != 1)}; rddrs "
            f"needs N x {classes} (one logit per class)"
        )
    if not out.is_floating_point():
        raise RDDRSError(
            f"{name} gives outputs of type {str(out.dtype).removeprefix('torch.')}; rddrs needs "
            f"floating-point logits (the searches take their gradients)"
        )
    if not torch.isfinite(out).all():
        raise RDDRSError(
            f"{name} gives NaN or infinite outputs on test images; its certificates would be "
            f"meaningless: check the model"
        )


def _load_program(path: Path, device: torch.device) -> nn.Module:
    try:
        exported = torch.export.load(path)
        program = exported.module()
    except Exception as err:  # any failure to deserialise means an unusable file
        raise RDDRSError(f"cannot load {path} as a torch.export program ({one_line(err, 200)})") from None
    expects = _program_inputs(exported)
    wanted = "N x " + " x ".join(map(str, INPUT_SHAPE))
    if (
        len(expects) != 1
        or len(expects[0]) != 1 + len(INPUT_SHAPE)
        or any(isinstance(e, int) and e != w for e, w in zip(expects[0][1:], INPUT_SHAPE))
    ):
        shown = ", ".join(" x ".join(map(str, shape)) for shape in expects) or "no input"
        raise RDDRSError(
            f"{path} was exported for inputs {shown}; rddrs gives it {wanted} images in [0, 1] "
            f"(export it with such an example input and a dynamic batch dimension)"
        )
    # channels-last convolution weights, as a checkpoint's: the same logits, twice as fast on a CPU
    model = ExportedModel(program).to(device, memory_format=torch.channels_last)
    try:  # what the signature does not show (e.g. a fixed batch size) shows on a small batch
        with torch.no_grad():
            model(torch.zeros(2, *INPUT_SHAPE, device=device))
    except Exception as err:
        raise RDDRSError(
            f"{path} does not run on a batch of 2 x {' x '.join(map(str, INPUT_SHAPE))} images "
            f"({one_line(err, 200)}); rddrs gives it {wanted} images in [0, 1], with a dynamic "
            f"batch dimension N"
        ) from None
    return model


def _program_inputs(exported) -> list[tuple]:
    """The shapes of a program's user inputs, a symbolic size shown as N (the batch) or its name."""
    names = set(exported.graph_signature.user_inputs)
    shapes = []
    for node in exported.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in names else None
        if isinstance(value, torch.Tensor):
            shapes.append(
                tuple(int(d) if isinstance(d, int) else "N" if i == 0 else str(d) for i, d in enumerate(value.shape))
            )
    return shapes


#: how torch.load(weights_only=True) names the class of a pickled object it refuses
_PICKLED_OBJECT = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load_checkpoint(path: Path, device: torch.device) -> nn.Module:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        if unsafe := _PICKLED_OBJECT.search(str(err)):
            raise RDDRSError(
                f"{path} is a pickled {unsafe[1]}, not a checkpoint: rddrs loads weights only, it "
                f"runs no pickled code; save {{'state_dict': model.state_dict(), 'arch': ...}} "
                f"or export the model with torch.export (.pt2)"
            ) from None
        raise RDDRSError(f"cannot read {path} as a checkpoint or torch.export program ({one_line(err, 200)})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state, arch, kwargs = ckpt["state_dict"], ckpt.get("arch"), ckpt.get("arch_kwargs")
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        state, arch, kwargs = ckpt, None, None  # a bare state dict
    else:
        raise RDDRSError(
            f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a dict with 'state_dict' and 'arch')"
        )
    if arch is None:
        arch, kwargs = _arch_from_sidecar(path)
    if arch not in ARCHITECTURES:
        raise RDDRSError(f"{path}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        model = ARCHITECTURES[arch](**(kwargs or {}))
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise RDDRSError(f"{path}: weights do not fit architecture {arch} ({one_line(err, 300)})") from None
    # channels-last convolution weights: about twice the CPU throughput for this small CNN
    return model.to(device, memory_format=torch.channels_last)


def _arch_from_sidecar(path: Path) -> tuple[str, dict | None]:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise RDDRSError(f"{path} does not name its architecture and has no sidecar {sidecar}")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RDDRSError(f"cannot read sidecar {sidecar} ({one_line(err)})") from None
    arch = meta.get("arch", meta.get("architecture")) if isinstance(meta, dict) else None
    if not isinstance(arch, str):
        raise RDDRSError(f"sidecar {sidecar} has no 'arch' naming the architecture of {path}")
    kwargs = meta.get("arch_kwargs")
    return arch, kwargs if isinstance(kwargs, dict) else None
