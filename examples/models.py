"""The SNIP paper's networks: LeNet-300-100 and LeNet-5-Caffe (Table 1), VGG-D with BatchNorm (Table 2), LSTM and
GRU classifiers of sequential MNIST (an image read as 28 time steps of 28 pixels), and torchvision's ResNet-18 adapted
to 32x32 inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torchvision
from torch import nn

Arch = Literal[
    "lenet300",
    "lenet5",
    "vgg_d",
    "resnet18",
    "resnet8",
    "resnet8w2",
    "lstm",
    "gru",
    "lstm_s",
    "gru_s",
    "lstm_b",
    "gru_b",
    "gru_s_default",
    "lstm_s_tf",
    "gru_s_tf",
]


def lenet_300_100(num_classes: int = 10) -> nn.Module:
    """Fully connected 784-300-100-10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet_5_caffe(num_classes: int = 10) -> nn.Module:
    """Caffe's LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500 with ReLU, fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def variance_scaling_(net: nn.Module) -> nn.Module:
    """The official SNIP code's initialization, in place: TensorFlow's ``variance_scaling_initializer`` defaults.

    Every convolution and linear weight is drawn from a normal distribution truncated at two standard deviations and
    rescaled to a standard deviation of ``1/sqrt(fan_in)``; every bias is zero. PyTorch's default draws uniformly
    within ``1/sqrt(fan_in)`` (a standard deviation ``sqrt(3)`` times smaller) and gives the biases the same range.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            std = (1.0 / module.weight[0].numel()) ** 0.5 / TRUNCATED_STD
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


# The standard deviation of a unit normal truncated to [-2, 2], by which TensorFlow divides to keep the variance.
TRUNCATED_STD = 0.87962566103423978


class RowRNN(nn.Module):
    """Sequential MNIST: reads a 28x28 image as 28 time steps of one 28-pixel row each, one recurrent layer, and
    classifies from the last hidden state. SNIP prunes its input-to-hidden and hidden-to-hidden matrices and the
    classifier (biases stay dense).

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        hidden_size: Width of the hidden state. The paper's LSTM-s/GRU-s (137k / 104k parameters) and LSTM-b/GRU-b
            (536k / 404k) are one layer of 170 and 350 units reading 28-pixel rows (``PAPER_SIZES``).
        num_classes: Number of classes.
        init: ``"glorot"``: variance scaling (Glorot uniform) for each gate's input and recurrent matrix on its
            own, biases zero, as the paper trains every recurrent network ("VS-X"); ``"tf"``: ``"glorot"`` with
            the gate biases TensorFlow's cells start from (``tf_gate_biases_``); ``"default"``: PyTorch's
            uniform(-1/sqrt(h), 1/sqrt(h)) for all of them.
    """

    def __init__(
        self,
        cell: Literal["lstm", "gru"],
        hidden_size: int = 128,
        num_classes: int = 10,
        init: Literal["default", "glorot", "tf"] = "default",
    ) -> None:
        super().__init__()
        layer = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = layer(28, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        if init in ("glorot", "tf"):
            glorot_gates_(self.rnn)
        if init == "tf":
            tf_gate_biases_(self.rnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, _ = self.rnn(x.reshape(len(x), 28, 28))
        return self.head(rows[:, -1])


PAPER_SIZES = {"s": 170, "b": 350}
"""Hidden units of the paper's small and big recurrent networks, from their parameter counts (see ``RowRNN``)."""


GATES = {nn.LSTM: ("input", "forget", "cell", "output"), nn.GRU: ("reset", "update", "new")}
"""Each cell's gates in the order PyTorch stacks their blocks in every weight matrix and bias."""


def glorot_gates_(rnn: nn.LSTM | nn.GRU) -> None:
    """Glorot-uniform each gate's block of every input-to-hidden and hidden-to-hidden matrix (fan-in and fan-out of
    that gate alone), and zero the biases."""
    gates = len(GATES[type(rnn)])
    for name, param in rnn.named_parameters():
        if name.startswith("weight"):
            for block in param.data.chunk(gates, dim=0):
                nn.init.xavier_uniform_(block)
        else:
            nn.init.zeros_(param)


def tf_gate_biases_(rnn: nn.LSTM | nn.GRU) -> None:
    """On zeroed biases (``glorot_gates_``), start the gates as TensorFlow's cells do, the framework of the paper's
    experiments: an LSTM's forget gate with a bias of 1 (``LSTMCell(forget_bias=1.0)``), a GRU's reset and update
    gates with biases of 1 (``GRUCell``'s gate bias initializer). PyTorch adds two bias vectors per gate; the 1 goes
    into the input one, ``bias_ih``, in the blocks ``GATES`` names."""
    hidden = rnn.hidden_size
    gates = slice(hidden, 2 * hidden) if isinstance(rnn, nn.LSTM) else slice(0, 2 * hidden)
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                param[gates] = 1.0


_VGG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_d(num_classes: int = 10) -> nn.Module:
    """VGG-D (VGG-16) for 32x32 inputs, BatchNorm after every conv, two 512-wide fully connected layers."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG_D:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(512, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, the usual form for 32x32 images."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def resnet8(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A small ResNet for 28x28 grey images: a 3x3 stem of `width` channels, three stages of one basic block (`width`,
    2 `width` and 4 `width` channels; the last two halve the resolution), global average pooling, one linear layer.
    `width=16` is ResNet-8; `width=32` its twice-as-wide form (`resnet8w2`)."""

    def stage(inplanes: int, planes: int, stride: int) -> nn.Module:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        return torchvision.models.resnet.BasicBlock(inplanes, planes, stride, downsample)

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        stage(width, width, 1),
        stage(width, 2 * width, 2),
        stage(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "lenet300": lenet_300_100,
    "lenet5": lenet_5_caffe,
    "vgg_d": vgg_d,
    "resnet18": resnet18_cifar,
    "resnet8": resnet8,
    "resnet8w2": lambda num_classes: resnet8(num_classes, width=32),
    "lstm": lambda num_classes: RowRNN("lstm", num_classes=num_classes),
    "gru": lambda num_classes: RowRNN("gru", num_classes=num_classes),
    # the paper's recurrent networks: its sizes and its (variance scaling) initialization; `_default` for its Table 3
    "lstm_s": lambda num_classes: RowRNN("lstm", PAPER_SIZES["s"], num_classes, init="glorot"),
    "gru_s": lambda num_classes: RowRNN("gru", PAPER_SIZES["s"], num_classes, init="glorot"),
    "lstm_b": lambda num_classes: RowRNN("lstm", PAPER_SIZES["b"], num_classes, init="glorot"),
    "gru_b": lambda num_classes: RowRNN("gru", PAPER_SIZES["b"], num_classes, init="glorot"),
    "gru_s_default": lambda num_classes: RowRNN("gru", PAPER_SIZES["s"], num_classes, init="default"),
    "lstm_s_tf": lambda num_classes: RowRNN("lstm", PAPER_SIZES["s"], num_classes, init="tf"),
    "gru_s_tf": lambda num_classes: RowRNN("gru", PAPER_SIZES["s"], num_classes, init="tf"),
}


def build(arch: Arch, num_classes: int = 10) -> nn.Module:
    """Build a network by name."""
    if arch not in BUILDERS:
        raise ValueError(f"`arch` must be one of {sorted(BUILDERS)}, got {arch!r}.")
    return BUILDERS[arch](num_classes)
