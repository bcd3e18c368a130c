"""Model forwards compile as one graph: value checks (label range, NaN, mask rows) run in eager
calls only, so `torch.compile` sees no data-dependent branch (each would also be a GPU->CPU sync)."""

import torch

from tinydit.dit import DiT, DiTConfig
from tinydit.textdit import TextDiT, TextDiTConfig


def graph_breaks(model, *args, **kwargs) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    for reason in explanation.break_reasons:
        print(reason)
    return explanation.graph_break_count


def test_dit_forward_has_no_graph_breaks():
    model = DiT(DiTConfig.preset("book", depth=2)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 499.5]), torch.tensor([1, 18])
    with torch.no_grad():
        assert graph_breaks(model, x, t, y) == 0


def test_text_dit_forward_has_no_graph_breaks():
    model = TextDiT(TextDiTConfig.preset("book-text", depth=2)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 499.5])  # float times, as samplers pass them
    ctx, pooled = torch.randn(2, 5, 96), torch.randn(2, 64)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        assert graph_breaks(model, x, t, context=ctx, context_mask=mask, pooled=pooled) == 0


def test_eager_calls_still_check_values():
    import pytest

    model = DiT(DiTConfig.preset("book", depth=1)).eval()
    with pytest.raises(ValueError, match=r"y: labels must be in \[0, 18\]"):
        model(torch.randn(1, 4, 8, 8), 3, torch.tensor([19]))
    x = torch.randn(1, 4, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite values, got 1 NaN"):
        model(x, 3, None)
    with pytest.raises(ValueError, match="t: expected finite values"):
        model(torch.randn(1, 4, 8, 8), float("inf"), None)
