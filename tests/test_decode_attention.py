"""The Triton decode-attention kernel against a plain reference. It runs where Triton is
installed: on a GPU, or on the CPU with ``TRITON_INTERPRET=1`` (CI has no Triton: skipped)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from realtime.models.decode_attention import decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference(q, kc, vc, slots, pos):
    b, hq, d = q.shape
    hkv = kc.shape[2]
    out = []
    for i in range(b):
        k = kc[slots[i], : pos[i] + 1].float()
        v = vc[slots[i], : pos[i] + 1].float()
        qq = q[i].float().reshape(hkv, hq // hkv, d)
        p = (torch.einsum("hgd,nhd->hgn", qq, k) * d**-0.5).softmax(-1)
        out.append(torch.einsum("hgn,nhd->hgd", p, v).reshape(hq, d))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", [(0, 5), (63, 64), (130, 299)])
def test_matches_the_reference(dtype, positions):
    torch.manual_seed(0)
    slots_n, length, hkv, d, hq = 3, 300, 2, 128, 10  # a query group of 5, as in Qwen2.5-32B
    kc = torch.randn(slots_n, length, hkv, d, device=DEVICE).to(dtype)
    vc = torch.randn(slots_n, length, hkv, d, device=DEVICE).to(dtype)
    q = torch.randn(2, hq, d, device=DEVICE).to(dtype)
    slots = torch.tensor([2, 0], device=DEVICE)
    pos = torch.tensor(positions, device=DEVICE)
    out = decode_attention(q, kc, vc, slots, pos, d**-0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape and out.dtype == dtype
    assert (out.float() - reference(q, kc, vc, slots, pos)).abs().max().item() < tol
