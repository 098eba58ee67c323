"""[Note: views become reshapes for the exporters]: ATen ``view`` nodes reach the exporters as
``reshape``, so a converter that decomposes the program again with other strides (OpenVINO's) does
not fail on them; the caller's graph is left alone."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends._export import reshapes_for_views
from torch_collage.backends.registry import get_spec


def test_views_become_reshapes_in_a_copy() -> None:
    x = torch.randn(2, 3, 4)
    gm = make_fx(lambda a: (a * 2).view(6, 4).sum(0))(x)
    before = [n.target for n in gm.graph.nodes]
    out = reshapes_for_views(gm)
    assert torch.ops.aten.view.default in before
    assert [n.target for n in gm.graph.nodes] == before  # the caller's graph is unchanged
    targets = [n.target for n in out.graph.nodes]
    assert torch.ops.aten.view.default not in targets and torch.ops.aten.reshape.default in targets
    torch.testing.assert_close(out(x), gm(x))
    plain = make_fx(lambda a: a.relu())(x)
    assert reshapes_for_views(plain) is plain


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_openvino_takes_hf_encoders_whole(arch: str, tmp_path) -> None:
    """A BERT's and a ViT's whole graphs failed OpenVINO's conversion ("Cannot view a tensor ...")."""
    if not get_spec("openvino").available()[0]:
        pytest.skip("openvino not installed")
    pytest.importorskip("transformers")
    from torch_zoo.hf import ARCHITECTURES

    build, make_inputs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model, kwargs = build().eval(), make_inputs()

    class Positional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> object:
            return self.model(**dict(zip(kwargs, args)))

    report = torch_collage.explain(
        Positional(), *kwargs.values(), backends=["openvino"], mode="fast", cache_dir=str(tmp_path),
        progress=False,
    )  # fmt: skip
    (graph,) = report.graphs
    assert "openvino" not in graph.whole_graph_failures, graph.whole_graph_failures
    assert graph.single_backend_ms["openvino"] < float("inf")
