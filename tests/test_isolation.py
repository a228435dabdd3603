import random

import numpy as np
import torch
import torchmetrics
from torch import nn

from lightning_snip.isolation import leave_no_trace


class WithEverything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=4)
        self.register_buffer("counter", torch.zeros(()))


def test_everything_but_parameter_values_is_restored():
    model = WithEverything()
    model.eval()
    model.bn.train()
    model.lin.weight.grad = torch.full_like(model.lin.weight, 7.0)
    grad_obj = model.lin.weight.grad
    counter_obj = model.counter
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)

    with leave_no_trace(model):
        model.train()
        out = model.drop(model.bn(model.lin(torch.randn(8, 4))))
        out.sum().backward()
        model.acc.update(out, torch.randint(0, 4, (8,)))
        model.counter += 1
        model.counter = torch.ones(())  # reassigned buffer
        random.random()
        np.random.rand()

    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        expected[0].tolist(),
        expected[1],
        expected[2],
    )
    assert not model.training
    assert model.bn.training
    assert not model.lin.training
    assert model.bn.running_mean.tolist() == [0.0] * 4
    assert int(model.bn.num_batches_tracked) == 0
    assert model.counter is counter_obj
    assert float(model.counter) == 0.0
    assert model.lin.weight.grad is grad_obj
    assert (grad_obj == 7.0).all()
    assert model.lin.bias.grad is None
    assert model.acc._update_count == 0
    assert model.acc.tp.sum() == 0


def test_restores_after_an_exception():
    bn = nn.BatchNorm1d(2)
    try:
        with leave_no_trace(bn):
            bn(torch.randn(4, 2))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert int(bn.num_batches_tracked) == 0
