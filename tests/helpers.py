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


# Whole-model checks (PEFT and transformers integrations), where many ops compose: a fixed per-dtype floor relative
# to max(1, |ref64|) stands in for the one-ulp floor above.
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_within_ref(name, out, ref64, ref_lp, dtype):
    """|out - ref64| <= 2 |ref_lp - ref64| + floor * max(1, |ref64|), all as max norms."""
    scale = max(1.0, ref64.abs().max().item())
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lp.double() - ref64).abs().max().item()
    bound = 2 * ref_err + FLOOR[dtype] * scale
    print(f"{name}: err {err:.3e}  ref err {ref_err:.3e}  bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e} (reference error {ref_err:.3e})"
