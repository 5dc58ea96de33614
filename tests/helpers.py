"""Shared test helpers: tolerances derived from the reference's own error in a dtype (STYLE.md)."""
import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def assert_close_to_reference(name, got, ref64, ref_lowp, dtype, factor=2.0, magnitude=None):
    """The kernel may err at most `factor` times what the plain formula computed in `dtype` errs, plus one ulp of
    the largest reference value: |got - ref64|_max <= factor * |ref_lowp - ref64|_max + eps(dtype) * |ref64|_max.

    With `magnitude` (the same formula on absolute values, fp64), 4 fp32 ulps of it are added: a sum that cancels is
    only known to eps * sum(|terms|), and the plain formula sometimes rounds luckily on a single element. Any real
    bug (a wrong mask, a missing term) is orders of magnitude above it."""
    got = got.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    ref_lowp = ref_lowp.detach().double().cpu()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs()
    err_ref = (ref_lowp - ref64).abs().max().item()
    floor = torch.finfo(dtype).eps * ref64.abs().max().item()
    if magnitude is not None:
        floor += 4 * torch.finfo(torch.float32).eps * magnitude.detach().abs().max().item()
    bound = factor * err_ref + floor
    print(f"{name} [{dtype}]: max err {err.max().item():.3e} mean {err.mean().item():.3e}; "
          f"reference's own {err_ref:.3e}; bound {bound:.3e}")
    assert err.max().item() <= bound, f"{name}: max error {err.max().item():.3e} > bound {bound:.3e}"
