import pytest
import torch
from torch import nn

from lightning_snip import (
    Criterion,
    ScoringContext,
    ScoringError,
    available_criteria,
    get_criterion,
    mean_gradients,
    register_criterion,
    select_masks,
)
from lightning_snip.scoring import _REGISTRY


def _golden_layer() -> tuple[nn.Linear, torch.Tensor]:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    return layer, torch.tensor([[1.0, 2.0]])


def test_snip_golden_scores():
    # L = 0.5 * sum(y^2), y = W x = [-3, 4]  =>  dL/dW_ij = y_i x_j = [[-3, -6], [4, 8]]
    # |dL/dW * W| = [[3, 12], [12, 4]]
    layer, x = _golden_layer()
    context = ScoringContext(weights={"w": layer.weight}, loss_fn=lambda i: 0.5 * (layer(x) ** 2).sum())
    scores = get_criterion("snip").score(context)
    assert scores["w"].tolist() == [[3.0, 12.0], [12.0, 4.0]]
    assert select_masks(scores, 0.5)["w"].tolist() == [[False, True], [True, False]]
    assert layer.weight.grad is None  # scoring uses autograd.grad, never .grad


def test_magnitude_and_random():
    layer, _ = _golden_layer()
    context = ScoringContext(weights={"w": layer.weight}, generator=torch.Generator().manual_seed(3))
    assert get_criterion("magnitude").score(context)["w"].tolist() == [[1.0, 2.0], [3.0, 0.5]]
    drawn = get_criterion("random").score(context)["w"]
    assert torch.equal(drawn, torch.rand(2, 2, generator=torch.Generator().manual_seed(3)))  # from `generator` only
    other = ScoringContext(weights={"w": layer.weight}, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(get_criterion("random").score(other)["w"], drawn)


def test_several_batches_average_raw_gradients_like_one_large_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    weights = {n: p for n, p in model.named_parameters() if p.ndim == 2}

    def loss_on(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xs), ys)

    two = mean_gradients(weights, lambda i: loss_on(x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]), 2)
    one = mean_gradients(weights, lambda i: loss_on(x, y), 1)
    for name in weights:
        torch.testing.assert_close(two[name], one[name])


def test_all_reduce_mean_is_applied():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    grads = mean_gradients({"w": w}, lambda i: (w * 3).sum(), 1, all_reduce_mean=lambda t: t * 10)
    assert grads["w"].tolist() == [30.0, 30.0]


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (lambda w: (w * float("nan")).sum(), "not finite"),
        (lambda w: w.detach().sum(), "no autograd graph"),
        (lambda w: w * 2, "must be a scalar tensor"),
        (lambda w: None, "must be a scalar tensor, got NoneType"),
    ],
    ids=["nan-loss", "detached", "not-scalar", "none"],
)
def test_bad_losses(loss_fn, match):
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ScoringError, match=match):
        mean_gradients({"w": w}, lambda i: loss_fn(w), 1)


def test_non_finite_gradient_names_the_tensor():
    w = torch.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(ScoringError, match="gradient of `w` is not finite"):
        mean_gradients({"w": w}, lambda i: w.sqrt().sum(), 1)  # d sqrt(w)/dw at 0 is inf, loss is finite


def test_unused_weight_gets_zero_gradient():
    w, unused = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    grads = mean_gradients({"w": w, "unused": unused}, lambda i: w.sum(), 1)
    assert grads["unused"].tolist() == [0.0, 0.0, 0.0]


def test_registry_extension_and_errors():
    assert available_criteria() == ["force", "grasp", "iterative_snip", "magnitude", "random", "snip", "synflow"]
    with pytest.raises(ValueError, match=r"`criterion` must be one of .* got 'prospr'"):
        get_criterion("prospr")

    @register_criterion("negated-magnitude-test")
    class NegatedMagnitude(Criterion):
        def score(self, context):
            return {n: 1 / (1 + w.detach().abs()) for n, w in context.weights.items()}

    try:
        assert isinstance(get_criterion("negated-magnitude-test"), NegatedMagnitude)
        with pytest.raises(ValueError, match="already registered"):
            register_criterion("snip")(NegatedMagnitude)
    finally:
        del _REGISTRY["negated-magnitude-test"]


def test_gradient_buffers_shared_by_autograd_are_not_corrupted():
    # d/da and d/db of (x @ (a + b)).sum() are one and the same tensor object; of (a + b).sum() an expanded one.
    a = torch.tensor([[1.0, -2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[0.5, 0.5], [-1.0, 2.0]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    g = x.sum(0, keepdim=True).T.expand(2, 2)  # = x^T @ ones: [[4, 4], [6, 6]]
    for loss_fn, grad in ((lambda i: (x @ (a + b)).sum(), g), (lambda i: (a + b).sum(), torch.ones(2, 2))):
        scores = get_criterion("snip").score(ScoringContext(weights={"a": a, "b": b}, loss_fn=loss_fn, num_batches=2))
        torch.testing.assert_close(scores["a"], (grad * a).abs().detach())
        torch.testing.assert_close(scores["b"], (grad * b).abs().detach())
