"""The profiled time split attributes forward and backward work to the parts of the model."""
import torch

from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.scaling.train.step_split import CATEGORIES, StepProfiler

from conftest import dit_config  # noqa: E402


def test_split_attributes_forward_backward_and_caller_ranges():
    cfg = dit_config(hidden=64, depth=2, heads=4, in_channels=3, patch=(1, 2, 2), text_dim=32)
    torch.manual_seed(0)
    m = VideoDiT(cfg)
    m.init_weights()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, meta = pack([torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 1, 8, 12, generator=g)],
                   [torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)], cfg.patch)
    with StepProfiler(m) as sp:
        with sp.range("data_wait"):
            x = x.clone()
        out = m(x, torch.tensor([3.0, 500.0]), meta)
        out.square().mean().backward()
        with sp.range("optimizer"):
            opt.step()
    sec = sp.seconds()
    assert set(sec) == set(CATEGORIES)
    for part in ("attention", "mlp", "adaln_norms", "embedding", "optimizer", "data_wait"):
        assert sec[part] > 0, (part, sec)
    assert sec["communication"] == 0  # one process: no collectives
    split = sp.split(sum(sec.values()) * 1.25)  # wall time the profile did not see -> other
    assert abs(sum(split.values()) - 1) < 1e-3 and split["other"] >= 0.19
    # hooks are removed after the profiled step: the model runs as before
    assert not any(m_._forward_hooks or m_._forward_pre_hooks for m_ in m.modules())


def test_backward_time_goes_to_the_forward_op_category():
    """An MLP-only graph: its backward (the larger part) lands in 'mlp', not 'other'."""
    cfg = dit_config(hidden=64, depth=1, heads=4, in_channels=3, patch=(1, 2, 2), text_dim=32)
    m = VideoDiT(cfg)
    m.init_weights()
    h = torch.randn(512, 64, requires_grad=True)
    with StepProfiler(m) as sp:
        y = m.blocks[0].mlp(h)
        with torch.profiler.record_function("backward-only"):
            y.square().sum().backward()
    sec = sp.seconds()
    assert sec["mlp"] > 0.5 * sum(sec.values()), sec
