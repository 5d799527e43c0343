"""The Triton kernels of the ``triton`` backend (imported only when that backend runs; needs ``triton``).

The functions here are plain Python functions written in Triton's language; :mod:`biformer.ops.backends.triton`
turns them into GPU kernels (``triton.jit``) or interpreted CPU kernels (``TRITON_INTERPRET=1``) and
launches them. All three take head-major tensors flattened to (B = heads * N, R, L, d), addressed through
their strides, and the routing ``IDX`` (N, R, topk) (contiguous), with ``n = b % N``.

Notation: a query region's *routed keys* are the ``topk * L_kv`` tokens of its routed regions in routing
order; key position ``p`` is token ``p % L_kv`` of region ``IDX[n, r, p // L_kv]``. Key tiles of
``BLOCK_K`` positions may span several routed regions (stage 3 at 224 px: 16 regions of 4 tokens form one
tile of 64 keys), so a query region's whole key set is one or few tiles whatever the region size.

``UPCAST`` casts the half-precision operands of every ``tl.dot`` to float32 first. It is set only in the
interpreter, whose ``tl.dot`` on bfloat16 operands returns garbage (triton 3.8); products of two half
numbers are exact in float32, so this computes what the GPU's half-precision dot with float32
accumulation computes.

Only builtins of ``triton.language`` are used: ``tl.max``, ``tl.sum`` and ``tl.zeros`` are ``triton.jit``
functions, which the interpreter can call only when ``TRITON_INTERPRET=1`` was set before triton was
imported. Row maxima and sums are ``tl.reduce`` with triton's own combine functions (what ``tl.max`` and
``tl.sum`` expand to, run by the interpreter as numpy reductions) and zeros are ``tl.full``. That keeps
the interpreter usable however and whenever triton was imported (torch imports it for ``torch.compile``).
"""

from __future__ import annotations

import triton.language as tl


def routed_attention_forward(
    Q, K, V, IDX, OUT, LSE,  # noqa: ANN001, N803
    sq_b, sq_r, sq_l, sq_d,  # noqa: ANN001
    sk_b, sk_r, sk_l, sk_d,  # noqa: ANN001
    sv_b, sv_r, sv_l, sv_d,  # noqa: ANN001
    so_b, so_r, so_l, so_d,  # noqa: ANN001
    batch, regions, q_len, kv_len, topk, d_qk, d_v, scale,  # noqa: ANN001
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,  # noqa: N803
):
    """One program per (b, query region r, tile of BLOCK_Q queries): O = softmax(scale q k^T) v, LSE."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    q_tile = tl.program_id(2)
    n = b % batch
    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_valid = offs_q < q_len
    dqk_valid = offs_dqk < d_qk
    dv_valid = offs_dv < d_v

    q = tl.load(
        Q + b * sq_b + r * sq_r + offs_q[:, None] * sq_l + offs_dqk[None, :] * sq_d,
        mask=q_valid[:, None] & dqk_valid[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_Q,), 0.0, tl.float32)
    acc = tl.full((BLOCK_Q, BLOCK_DV), 0.0, tl.float32)
    routing = IDX + (n * regions + r) * topk
    total = topk * kv_len
    for start in range(0, total, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < total
        region = tl.load(routing + offs_k // kv_len, mask=k_valid, other=0).to(tl.int64)
        token = offs_k % kv_len
        k = tl.load(
            K + b * sk_b + region[:, None] * sk_r + token[:, None] * sk_l + offs_dqk[None, :] * sk_d,
            mask=k_valid[:, None] & dqk_valid[None, :], other=0.0,
        )
        v = tl.load(
            V + b * sv_b + region[:, None] * sv_r + token[:, None] * sv_l + offs_dv[None, :] * sv_d,
            mask=k_valid[:, None] & dv_valid[None, :], other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_Q, BLOCK_K)
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        OUT + b * so_b + r * so_r + offs_q[:, None] * so_l + offs_dv[None, :] * so_d,
        out.to(OUT.dtype.element_ty), mask=q_valid[:, None] & dv_valid[None, :],
    )
    tl.store(LSE + (b * regions + r) * q_len + offs_q, m_i + tl.log(l_i), mask=q_valid)


def routed_attention_backward_query(
    Q, K, V, IDX, DO, LSE, DELTA, DQ,  # noqa: ANN001, N803
    sq_b, sq_r, sq_l, sq_d,  # noqa: ANN001
    sk_b, sk_r, sk_l, sk_d,  # noqa: ANN001
    sv_b, sv_r, sv_l, sv_d,  # noqa: ANN001
    sdo_b, sdo_r, sdo_l, sdo_d,  # noqa: ANN001
    batch, regions, q_len, kv_len, topk, d_qk, d_v, scale,  # noqa: ANN001
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,  # noqa: N803
):
    """dQ of one (b, query region, query tile) from its routed keys; DQ is contiguous (B, R, L_q, d_qk)."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    q_tile = tl.program_id(2)
    n = b % batch
    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_valid = offs_q < q_len
    dqk_valid = offs_dqk < d_qk
    dv_valid = offs_dv < d_v

    q = tl.load(
        Q + b * sq_b + r * sq_r + offs_q[:, None] * sq_l + offs_dqk[None, :] * sq_d,
        mask=q_valid[:, None] & dqk_valid[None, :], other=0.0,
    )
    do = tl.load(
        DO + b * sdo_b + r * sdo_r + offs_q[:, None] * sdo_l + offs_dv[None, :] * sdo_d,
        mask=q_valid[:, None] & dv_valid[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    rows = (b * regions + r) * q_len + offs_q
    lse = tl.load(LSE + rows, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + rows, mask=q_valid, other=0.0)
    dq = tl.full((BLOCK_Q, BLOCK_DQK), 0.0, tl.float32)
    routing = IDX + (n * regions + r) * topk
    total = topk * kv_len
    for start in range(0, total, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < total
        region = tl.load(routing + offs_k // kv_len, mask=k_valid, other=0).to(tl.int64)
        token = offs_k % kv_len
        k = tl.load(
            K + b * sk_b + region[:, None] * sk_r + token[:, None] * sk_l + offs_dqk[None, :] * sk_d,
            mask=k_valid[:, None] & dqk_valid[None, :], other=0.0,
        )
        v = tl.load(
            V + b * sv_b + region[:, None] * sv_r + token[:, None] * sv_l + offs_dv[None, :] * sv_d,
            mask=k_valid[:, None] & dv_valid[None, :], other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(k_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = dq * scale
    tl.store(
        DQ + ((b * regions + r) * q_len + offs_q[:, None]) * d_qk + offs_dqk[None, :],
        dq.to(DQ.dtype.element_ty), mask=q_valid[:, None] & dqk_valid[None, :],
    )


def routed_attention_backward_key_value(
    Q, K, V, DO, LSE, DELTA, OFFSETS, SOURCES, DK, DV,  # noqa: ANN001, N803
    sq_b, sq_r, sq_l, sq_d,  # noqa: ANN001
    sk_b, sk_r, sk_l, sk_d,  # noqa: ANN001
    sv_b, sv_r, sv_l, sv_d,  # noqa: ANN001
    sdo_b, sdo_r, sdo_l, sdo_d,  # noqa: ANN001
    batch, regions, q_len, kv_len, d_qk, d_v, scale,  # noqa: ANN001
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,  # noqa: N803
):
    """dK, dV of one (b, key region s, tile of BLOCK_KV of its tokens), without atomics.

    The query regions that routed to region s of image n are ``SOURCES[OFFSETS[g]:OFFSETS[g + 1]]`` with
    ``g = n * R + s`` (the transposed routing, one entry per routing slot, in a fixed order), so each
    program owns its output tile and sums its contributions in the same order on every run.
    DK (B, R, L_kv, d_qk) and DV (B, R, L_kv, d_v) are contiguous.
    """
    b = tl.program_id(0).to(tl.int64)
    s_region = tl.program_id(1).to(tl.int64)
    kv_tile = tl.program_id(2)
    n = b % batch
    offs_k = kv_tile * BLOCK_KV + tl.arange(0, BLOCK_KV)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_valid = offs_k < kv_len
    dqk_valid = offs_dqk < d_qk
    dv_valid = offs_dv < d_v

    k = tl.load(
        K + b * sk_b + s_region * sk_r + offs_k[:, None] * sk_l + offs_dqk[None, :] * sk_d,
        mask=k_valid[:, None] & dqk_valid[None, :], other=0.0,
    )
    v = tl.load(
        V + b * sv_b + s_region * sv_r + offs_k[:, None] * sv_l + offs_dv[None, :] * sv_d,
        mask=k_valid[:, None] & dv_valid[None, :], other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.full((BLOCK_KV, BLOCK_DQK), 0.0, tl.float32)
    dv = tl.full((BLOCK_KV, BLOCK_DV), 0.0, tl.float32)
    g = n * regions + s_region
    first = tl.load(OFFSETS + g)
    last = tl.load(OFFSETS + g + 1)
    for entry in range(first, last):
        r = tl.load(SOURCES + entry).to(tl.int64)  # a query region of image n that routed to s
        for q_start in range(0, q_len, BLOCK_Q):
            offs_q = q_start + tl.arange(0, BLOCK_Q)
            q_valid = offs_q < q_len
            q = tl.load(
                Q + b * sq_b + r * sq_r + offs_q[:, None] * sq_l + offs_dqk[None, :] * sq_d,
                mask=q_valid[:, None] & dqk_valid[None, :], other=0.0,
            )
            do = tl.load(
                DO + b * sdo_b + r * sdo_r + offs_q[:, None] * sdo_l + offs_dv[None, :] * sdo_d,
                mask=q_valid[:, None] & dv_valid[None, :], other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            rows = (b * regions + r) * q_len + offs_q
            lse = tl.load(LSE + rows, mask=q_valid, other=0.0)
            delta = tl.load(DELTA + rows, mask=q_valid, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_Q, BLOCK_KV)
            p = tl.exp(scores - lse[:, None])
            p = tl.where(q_valid[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk = dk * scale
    rows_kv = (b * regions + s_region) * kv_len + offs_k
    tl.store(
        DK + rows_kv[:, None] * d_qk + offs_dqk[None, :], dk.to(DK.dtype.element_ty),
        mask=k_valid[:, None] & dqk_valid[None, :],
    )
    tl.store(
        DV + rows_kv[:, None] * d_v + offs_dv[None, :], dv.to(DV.dtype.element_ty),
        mask=k_valid[:, None] & dv_valid[None, :],
    )
