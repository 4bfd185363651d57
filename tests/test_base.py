"""The shared mechanics in normlab.base, and normlab.BatchNorm (torch's kernel for any rank)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
import normlab.kernels as base
from normlab.base import Moments, batch_moments, inference_affine, load_statistics
from normlab.checks import check_input
from normlab.kernels import channel_moments, channel_stats


@pytest.mark.parametrize("shape", [(7, 3), (5, 3, 4), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_channel_moments_match_definition(shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    mean, var, count = channel_moments(x)
    flat = x.transpose(0, 1).reshape(shape[1], -1)
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(var, flat.var(1, unbiased=False))
    assert int(count) == flat.shape[1]


def _reference_stats(x):
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


@pytest.mark.parametrize("chunk_bytes", [1 << 21, 64, 300])  # one chunk; one sample a chunk; uneven chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_scratch", [False, True])
def test_channel_stats_two_pass_path_matches_definition(monkeypatch, chunk_bytes, dtype, with_scratch):
    monkeypatch.setattr(base, "_WHOLE_BYTES", 0)
    monkeypatch.setattr(base, "_CHUNK_BYTES", chunk_bytes)
    # Far from zero, so that a one-pass sum of squares would have lost the variance.
    x = torch.randn(7, 3, 4, 5, dtype=dtype) * 0.5 + 1000
    assert base.two_pass_stats(x)
    mean, var = channel_stats(x, torch.empty_like(x) if with_scratch else None)
    ref_mean, ref_var = _reference_stats(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)
    assert mean.dtype == dtype and var.dtype == dtype


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 3),  # 2-D
        lambda: torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(4, 3, 1, 1),  # no spatial extent
        lambda: torch.randn(4, 6, 5, 5)[:, ::2],  # not contiguous
        lambda: torch.randn(4, 3, 5, 5).to(torch.bfloat16),  # float32 statistics
    ],
)
def test_channel_stats_other_layouts(make):
    x = make()
    assert not base.two_pass_stats(x)
    mean, var = channel_stats(x)
    ref_mean, ref_var = _reference_stats(x.float())
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_stats_and_output_buffer_then_inference(shape):
    x = torch.randn(shape) * 2 + 1
    mean, var, out = base.stats_and_output_buffer(x)
    assert (out is not None) == base.two_pass_stats(x)
    ref_mean, ref_var = _reference_stats(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-6)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y = base.inference_batch_norm(x, w, b, mean, var, 1e-5, out)
    assert out is None or y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, nn.functional.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))


def test_two_pass_stats_needs_samples_and_spatial_extent():
    assert not base.two_pass_stats(torch.empty(0, 3, 5, 5))
    assert not base.two_pass_stats(torch.empty(4, 0, 5, 5))
    assert not base.two_pass_stats(torch.empty(4, 3, 1))
    assert not base.two_pass_stats(torch.empty(4, 3, 2, 2))  # torch's kernel is faster at 2x2 maps
    assert base.two_pass_stats(torch.empty(1, 3, 16))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    chunk_bytes=st.integers(4, 2000),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
)
def test_channel_stats_property(n, c, spatial, chunk_bytes, scale):
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * scale + 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "_WHOLE_BYTES", 0)
        patch.setattr(base, "_CHUNK_BYTES", chunk_bytes)
        mean, var = channel_stats(x)
    ref_mean, ref_var = _reference_stats(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=1e-12)
    assert (var >= 0).all()


@pytest.mark.parametrize(
    "shape,sizes",
    [
        ((12, 3, 4, 5), [4, 4, 4]),  # equal, two passes of its own: all micro-batches at once
        ((12, 3, 2, 2), [4, 4, 4]),  # equal, small maps: the stacked copy
        ((10, 3, 4, 5), [4, 4, 2]),  # a remainder: one by one
        ((12, 3, 40, 40), [4, 4, 4]),  # above the one-sweep size (patched below): one by one, in chunks
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_micro_batch_stats_match_definition(monkeypatch, shape, sizes, channels_last):
    from normlab.kernels import micro_batch_stats

    monkeypatch.setattr(base, "_WHOLE_BYTES", 40 * 40 * 3 * 4 * 8)
    monkeypatch.setattr(base, "_CHUNK_BYTES", 40 * 40 * 3 * 4 * 3)
    # Far from zero, so that a one-pass sum of squares would have lost the variance.
    x = torch.randn(shape, dtype=torch.float32) * 0.5 + 1000
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, var = micro_batch_stats(x, sizes)
    parts = [_reference_stats(chunk) for chunk in x.split(sizes)]
    torch.testing.assert_close(mean.double(), torch.stack([m for m, _ in parts]), rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), torch.stack([v for _, v in parts]), rtol=1e-4, atol=0)


def test_channel_moments_low_precision_in_float32():
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    mean, var, _ = channel_moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


def test_check_input_messages():
    with pytest.raises(ValueError, match=r"Layer: expected 4 channels in dimension 1 .* got shape \(2, 5\)"):
        check_input("Layer", torch.zeros(2, 5), 4, training=False)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        check_input("Layer", torch.zeros(4), 4, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        check_input("Layer", torch.zeros(1, 4, 1, 1), 4, training=True)
    check_input("Layer", torch.zeros(1, 4, 1, 2), 4, training=True)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 2, 2)])
def test_normlab_batchnorm_is_torch_batchnorm_for_any_rank(shape):
    torch.manual_seed(0)
    ours = normlab.BatchNorm(4)
    theirs = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](4)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    theirs.load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match="BatchNorm: expected 4 channels"):
        ours(torch.randn(2, 3))


def test_statistics_interface_for_torch_batchnorm():
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float32)
    m = batch_moments(bn, x)
    assert isinstance(m, Moments) and m.count == 100
    load_statistics(bn, m.mean, m.var * m.count / (m.count - 1))
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3)))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    a, b = inference_affine(bn)
    torch.testing.assert_close(bn(x), x * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        batch_moments(nn.BatchNorm2d(3, track_running_stats=False), x)
    with pytest.raises(ValueError, match="running statistics"):
        inference_affine(nn.LayerNorm(3))


def test_functional_running_updates_record_no_graph():
    # The functional forms run in grad mode, may take a momentum that requires grad, and update
    # buffers the caller owns (here leaves that require grad): the update is outside any graph.
    from normlab.cross_iteration import pooled_batch_norm
    from normlab.mean_only import mean_only_batch_norm

    x = torch.randn(8, 3, 4, 4)
    momentum = torch.tensor(0.1, requires_grad=True)
    for call in (
        lambda rm, rv: pooled_batch_norm(x, rm, rv, training=True, momentum=momentum),
        lambda rm, rv: mean_only_batch_norm(x, rm, None, training=True, momentum=momentum),
    ):
        running_mean, running_var = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
        call(running_mean, running_var)
        assert running_mean.grad_fn is None and running_var.grad_fn is None
        assert not torch.equal(running_mean.detach(), torch.zeros(3))
