"""One-kernel attention for the decode step (one new query per row) over the slot KV cache.

At batch 1-4 and a few hundred cached positions, attention is tiny; what costs is the number of
kernels per layer, replayed 64 times per token. Written as plain reductions, inductor emits two
or three kernels (scores, softmax, weighted sum); this Triton kernel does all of it in one
pass with an online softmax, one program per (row, KV head) covering that head's query group.
It reads the lane's cache rows through its slot index and its length from ``pos`` on the device,
so it is safe inside a CUDA graph.

A paged cache (``kv_pages.py``) has its own op, ``realtime::decode_attention_paged``: the
same kernel finds each block of ``BLOCK_N`` positions through the row's block-table entry
(pages of a multiple of ``BLOCK_N`` positions, so a block never straddles two pages).

Registered as custom ops so that ``torch.compile`` can keep them inside the compiled layer. Importing this module needs Triton; callers check
:func:`available` first.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - no Triton on this machine
    triton = None  # type: ignore[assignment]


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        slots_ptr,
        pos_ptr,
        table_ptr,
        stride_tb,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kl,
        stride_kh,
        stride_vs,
        stride_vl,
        stride_vh,
        stride_ob,
        stride_oh,
        scale,
        GROUP: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        PAGE: tl.constexpr,  # > 0: paged cache, positions per page (a multiple of BLOCK_N)
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        length = tl.load(pos_ptr + row) + 1  # the new token (already written) is visible
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kv_head * GROUP + g
        q_mask = g < GROUP
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=q_mask[:, None],
            other=0.0,
        )
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        local = tl.arange(0, BLOCK_N)
        for start in range(0, length, BLOCK_N):
            if PAGE > 0:  # the block's page, from the row's block table
                page = tl.load(table_ptr + row * stride_tb + start // PAGE).to(tl.int64)
                first = start % PAGE
            else:
                page = slot
                first = start
            k_base = k_ptr + page * stride_ks + first * stride_kl + kv_head * stride_kh
            v_base = v_ptr + page * stride_vs + first * stride_vl + kv_head * stride_vh
            n = start + local
            n_mask = n < length
            k = tl.load(
                k_base + local[:, None] * stride_kl + d[None, :], mask=n_mask[:, None], other=0.0
            )
            s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + local[:, None] * stride_vl + d[None, :], mask=n_mask[:, None], other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask[:, None],
        )

    BLOCK_N = 64

    def _launch(q, k_cache, v_cache, slots, pos, table, scale, page):  # noqa: ANN001, ANN202
        b, n_heads, d = q.shape
        n_kv = k_cache.shape[2]
        group = n_heads // n_kv
        out = torch.empty_like(q)
        wrap_triton(_decode_attention_kernel)[(b, n_kv)](
            q,
            k_cache,
            v_cache,
            out,
            slots,
            pos,
            table,
            table.stride(0),
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            out.stride(0),
            out.stride(1),
            scale,
            GROUP=group,
            G_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows
            D=d,
            BLOCK_N=BLOCK_N,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no TF32 for fp32 models
            PAGE=page,
        )
        return out

    @triton_op("realtime::decode_attention", mutates_args={})
    def decode_attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        pos: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``q [B, Hq, D]`` (the new token's queries), caches ``[slots, L, Hkv, D]`` holding the
        new token at ``pos [B]`` of ``slots [B]`` -> ``[B, Hq, D]``."""
        return _launch(q, k_cache, v_cache, slots, pos, slots[:, None], scale, 0)

    @triton_op("realtime::decode_attention_paged", mutates_args={})
    def decode_attention_paged(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        table: torch.Tensor,
        pos: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """As ``decode_attention`` over a paged cache ``[pages, page_size, Hkv, D]``: row ``b``'s
        positions are found through ``table [B, P]`` (its block-table row)."""
        return _launch(q, k_cache, v_cache, pos, pos, table, scale, k_cache.shape[1])
