"""The fast network: forward and input gradient of the project's CNN family at the CPU's speed.

For a stack conv(1 -> C1, k) -> ReLU -> maxpool 2 -> conv(C1 -> C2, k) -> ReLU -> maxpool 2 ->
linear (``models.MnistCNN``, whatever its dataset), the searches need the logits of many noisy
images and the gradient of a weighted sum of them with respect to the images. Below each 2x2
max pool only one of the four convolution outputs of a window (its first maximum, and only if
it is positive) receives a gradient, so each convolution's input gradient is a scatter of its
weights at those positions: a quarter of the multiply-adds of the dense transposed convolution
that autograd runs. ``fastnet.cpp`` holds two kernels (pool + ReLU with a one-byte position code
in one pass; the whole input gradient image by image in small buffers); the convolutions'
forward stays with oneDNN. The maths is autograd's; only the order of float32 additions differs.

``fast(model)`` wraps a recognised float32 CPU model in ``FastCNN``, an autograd-aware drop-in;
any other model is returned as it is. ``RDDRS_FAST_NETWORK=0`` (``rddrs --autograd-network``)
turns the fast path off. The extension is compiled with the machine's C++ compiler at first use
(``torch.utils.cpp_extension``, ninja) and cached per checkout and processor; where that fails the model keeps
the autograd path and one line says why, once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from rddrs import RDDRSError

#: the switch: "1" (the default) or "0"
SWITCH = "RDDRS_FAST_NETWORK"
FAST, AUTOGRAD = "fast", "autograd"


def enabled() -> bool:
    """Whether the fast path is asked for (``RDDRS_FAST_NETWORK``: 1, the default, or 0)."""
    value = os.environ.get(SWITCH, "1").strip()
    if value not in ("0", "1"):
        raise RDDRSError(f"{SWITCH}={value!r} is not a switch: set it to 1 (the fast network) or 0 (autograd)")
    return value == "1"


def _processor() -> str:
    """What the compiled code depends on: the CPU's model and flags (``-march=native``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


@lru_cache(maxsize=1)
def extension():
    """The compiled kernels, or None (with one warning) where they cannot be built here."""
    source = Path(__file__).with_name("fastnet.cpp")
    # one build per source, checkout (ninja rebuilds when the source's path changes), processor and torch
    digest = hashlib.sha256(
        source.read_bytes() + str(source.resolve()).encode() + _processor().encode() + torch.__version__.encode()
    ).hexdigest()
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # no CUDA notes on a CPU build
        from torch.utils import cpp_extension

        # ninja from the environment's own bin (pip's ninja) when the shell's PATH lacks it
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                name=f"rddrs_fastnet_{digest[:12]}",
                sources=[str(source)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                verbose=False,
            )
    except Exception as err:  # no compiler, no ninja, a failed build: the autograd path serves
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        print(f"rddrs: the fast network could not be built ({first}); using autograd", file=sys.stderr)
        return None


def recognise(model: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d, nn.Linear] | None:
    """The two convolutions and the linear layer of a model of the family, or None."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Linear) or len(features) != 6:
        return None
    conv1, relu1, pool1, conv2, relu2, pool2 = features
    for conv in (conv1, conv2):
        if not (
            type(conv) is nn.Conv2d
            and conv.bias is not None
            and conv.stride == (1, 1)
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and conv.kernel_size[0] == conv.kernel_size[1] <= 8
        ):
            return None
    for pool in (pool1, pool2):
        if not (
            type(pool) is nn.MaxPool2d
            and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1))
            and not pool.ceil_mode
            and not pool.return_indices
        ):
            return None
    if not (
        type(relu1) is nn.ReLU
        and type(relu2) is nn.ReLU
        and conv1.in_channels == 1
        and conv2.in_channels == conv1.out_channels
        and conv1.kernel_size == conv2.kernel_size
    ):
        return None
    return conv1, conv2, classifier


class _Function(torch.autograd.Function):
    """logits = net(x), with the input gradient of ``fastnet.cpp`` (the weights take none)."""

    @staticmethod
    def forward(ctx, x: Tensor, net: "FastCNN") -> Tensor:
        ext = net.ext
        p1, code1 = ext.pool_relu(net.conv1(x))
        p2, code2 = ext.pool_relu(net.conv2(p1))
        logits = net.fc(p2.flatten(1))  # as the model computes them, bit for bit
        ctx.net = net
        ctx.save_for_backward(code1, code2)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        code1, code2 = ctx.saved_tensors
        net = ctx.net
        return net.ext.input_grad(grad.contiguous(), net.fc_weight, code2, net.w2t, code1, net.w1), None


class FastCNN(nn.Module):
    """A model of the family with the fast forward and input gradient (float32 inputs on the CPU,
    weights without gradients); anything else goes through the wrapped model unchanged."""

    network = FAST

    def __init__(self, model: nn.Module, ext):
        super().__init__()
        conv1, conv2, fc = recognise(model)
        self.model, self.ext = model, ext
        self.conv1 = conv1.to(memory_format=torch.channels_last)
        self.conv2 = conv2.to(memory_format=torch.channels_last)
        self.fc = fc
        side, k = self._pooled_side(model, conv1, conv2), conv1.kernel_size[0]
        image = (2 * side + k - 1) * 2 + k - 1
        self.input_shape = (1, image, image)
        # for the gradient, the linear layer's columns in the channels-last order of the pooled features
        self.register_buffer(
            "fc_weight",
            fc.weight.detach()
            .reshape(fc.out_features, conv2.out_channels, side, side)
            .permute(0, 2, 3, 1)
            .reshape(fc.out_features, -1)
            .contiguous(),
            persistent=False,
        )
        self.register_buffer("w2t", conv2.weight.detach().permute(0, 2, 3, 1).contiguous(), persistent=False)
        # conv1's kernel rows padded with zeros to 8 (one 8-wide update per row in the kernel)
        self.register_buffer(
            "w1", nn.functional.pad(conv1.weight.detach()[:, 0], (0, 8 - k)).contiguous(), persistent=False
        )

    @staticmethod
    def _pooled_side(model, conv1, conv2) -> int:
        """The side of the last pooled feature map, from the linear layer's input size."""
        per_channel = model.classifier.in_features // conv2.out_channels
        side = int(round(per_channel**0.5))
        if side * side * conv2.out_channels != model.classifier.in_features:
            raise RDDRSError("the linear layer does not read square feature maps")
        return side

    def _usable(self, x: Tensor) -> bool:
        return (
            x.dim() == 4
            and tuple(x.shape[1:]) == self.input_shape
            and len(x) > 0
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not any(p.requires_grad for p in self.model.parameters())
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self._usable(x):
            return self.model(x)
        return _Function.apply(x.contiguous(memory_format=torch.channels_last), self)


def fast(model: nn.Module) -> nn.Module:
    """``FastCNN(model)`` for a recognised model on the CPU when the switch is on and the kernels
    build here; otherwise ``model`` itself (the autograd path)."""
    if not enabled() or recognise(model) is None or next(model.parameters()).device.type != "cpu":
        return model
    ext = extension()
    return model if ext is None else FastCNN(model, ext).eval()


def network_path(model: nn.Module) -> str:
    """Which path computes ``model``'s logits and input gradients, fast or autograd (looking
    through wrappers that keep the network as ``.model``)."""
    while not hasattr(model, "network") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return getattr(model, "network", AUTOGRAD)
