"""A deliberately plain float64 formulation of BRA, written from the paper's description with loops.

It shares no code with the library: regions, routing and attention are computed token by token so that
a mistake in the library's reshapes cannot hide in the same mistake here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def plain_routed_attention(q, k, v, grid_h, grid_w, topk, num_heads, scale, routing_scale, region_mean=None):
    """q, k: (H, W, Cqk), v: (H, W, Cv) on a map divisible by the grid. Returns (out (H, W, Cv), routing)."""
    height, width = q.shape[0], q.shape[1]
    region_h, region_w = height // grid_h, width // grid_w

    def tokens(t, region):
        row, col = divmod(region, grid_w)
        block = t[row * region_h : (row + 1) * region_h, col * region_w : (col + 1) * region_w]
        return block.reshape(region_h * region_w, t.shape[-1])

    regions = grid_h * grid_w
    if region_mean is None:
        q_mean = torch.stack([tokens(q, r).mean(0) for r in range(regions)])
        k_mean = torch.stack([tokens(k, r).mean(0) for r in range(regions)])
    else:
        q_mean, k_mean = region_mean
    logits = (q_mean * routing_scale) @ k_mean.T
    routing = logits.topk(topk, dim=-1).indices
    out = torch.zeros(height, width, v.shape[-1], dtype=q.dtype)
    qk_head, v_head = q.shape[-1] // num_heads, v.shape[-1] // num_heads
    for r in range(regions):
        query = tokens(q, r)
        keys = torch.cat([tokens(k, int(s)) for s in routing[r]])
        values = torch.cat([tokens(v, int(s)) for s in routing[r]])
        heads = []
        for m in range(num_heads):
            qm = query[:, m * qk_head : (m + 1) * qk_head]
            km = keys[:, m * qk_head : (m + 1) * qk_head]
            vm = values[:, m * v_head : (m + 1) * v_head]
            heads.append(torch.softmax(qm @ km.T * scale, dim=-1) @ vm)
        row, col = divmod(r, grid_w)
        out[row * region_h : (row + 1) * region_h, col * region_w : (col + 1) * region_w] = torch.cat(
            heads, dim=-1
        ).reshape(region_h, region_w, -1)
    return out, routing


def plain_bra(x, layer, auto_pad=False):
    """Legacy BRA (NHWC) of ``layer``'s parameters on x (N, H, W, C), in float64."""
    params = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    n_win, qk_dim, dim = layer.n_win, layer.qk_dim, layer.dim
    _, height, width, _ = x.shape
    region = getattr(layer, "region_size", None)
    if region:
        x = F.pad(x, (0, 0, 0, (-width) % region, 0, (-height) % region))
        grid_h, grid_w = x.shape[1] // region, x.shape[2] // region
    else:
        if auto_pad:
            x = F.pad(x, (0, 0, 0, (-width) % n_win, 0, (-height) % n_win))
        grid_h = grid_w = n_win
    outs, routings = [], []
    for image in x:
        qkv = image @ params["qkv.qkv.weight"].T + params["qkv.qkv.bias"]
        q, k, v = qkv[..., :qk_dim], qkv[..., qk_dim : 2 * qk_dim], qkv[..., 2 * qk_dim :]
        out, routing = plain_routed_attention(
            q, k, v, grid_h, grid_w, min(layer.topk, grid_h * grid_w), layer.num_heads, layer.scale, layer.scale
        )
        if "lepe.weight" in params:
            lepe = F.conv2d(
                v.permute(2, 0, 1)[None], params["lepe.weight"], params["lepe.bias"],
                padding=params["lepe.weight"].shape[-1] // 2, groups=dim,
            )[0].permute(1, 2, 0)
            out = out + lepe
        out = out @ params["wo.weight"].T + params["wo.bias"]
        outs.append(out[:height, :width])
        routings.append(routing)
    return torch.stack(outs), torch.stack(routings)


def plain_bra_nchw(x, layer):
    """The refactored NCHW BRA of ``layer``'s parameters on x (N, C, H, W), in float64."""
    params = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    dim = layer.dim
    _, _, height, width = x.shape
    region_h, region_w = max(height // layer.n_win, 1), max(width // layer.n_win, 1)
    grid_h, grid_w = math.ceil(height / region_h), math.ceil(width / region_w)
    outs, routings = [], []
    for image in x:
        qkv = torch.einsum("chw,oc->hwo", image, params["qkv_linear.weight"][:, :, 0, 0]) + params["qkv_linear.bias"]
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        # region means over valid tokens only
        def means(t):
            rows = []
            for gr in range(grid_h):
                for gc in range(grid_w):
                    block = t[gr * region_h : (gr + 1) * region_h, gc * region_w : (gc + 1) * region_w]
                    rows.append(block.reshape(-1, t.shape[-1]).mean(0))
            return torch.stack(rows)

        topk = min(layer.topk, grid_h * grid_w)
        pad = (0, 0, 0, grid_w * region_w - width, 0, grid_h * region_h - height)
        out, routing = plain_routed_attention(
            F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), grid_h, grid_w, topk, layer.num_heads, layer.scale, 1.0,
            region_mean=(means(q), means(k)),
        )
        out = out[:height, :width].permute(2, 0, 1)
        lepe = F.conv2d(
            v.permute(2, 0, 1)[None], params["lepe.weight"], params["lepe.bias"],
            padding=params["lepe.weight"].shape[-1] // 2, groups=dim,
        )[0]
        out = out + lepe
        out = torch.einsum("chw,oc->ohw", out, params["output_linear.weight"][:, :, 0, 0])
        outs.append(out + params["output_linear.bias"][:, None, None])
        routings.append(routing)
    return torch.stack(outs), torch.stack(routings)
