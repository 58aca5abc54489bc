"""Token merging and PYRA inside timm's ``Eva``: EVA-02, DINOv3, Perception Encoder, RoPE ViTs.

The patch mirrors the ViT path (``patch_vit``): classes are swapped, timm's submodules are reused
as they are (GluMlp/SwiGLU, scale norms, ``gamma_1``/``gamma_2`` layer scale, post-norm
placement, q/k norm, gates, ``AttentionPoolLatent``), tokens merge between attention and MLP,
and every prefix token (class, registers, DINOv3's storage tokens) is protected.

Rotary position embeddings under merging. A merged token's rotary embedding in a layer is the
size-weighted mean of its members' embeddings in that layer, taken on the (sin, cos) pair. Since
a member stands for ``size`` patches, this is the plain mean over the input patches the token
contains. The rotation ``R(sin, cos) q = q ⊙ cos + rot(q) ⊙ sin`` is linear in (sin, cos), so
for merged tokens i (members a) and j (members b)::

    (mean_a R_a q_i) · (mean_b R_b k_j) = mean_{a, b} (R_a q_i) · (R_b k_j)

the attention logit between two merged tokens is the mean of the logits over all pairs of their
members' positions. Prefix tokens get no rotation, as in timm.

- Embeddings shared by all layers (``cat``, ``dinov3``, ...) are merged alongside the tokens with
  the same ``merge`` closure and the same size weights (``TokenState.rope``).
- ``mixed`` RoPE learns frequencies per layer, and the mean of sin/cos of the members' angles is
  not the sin/cos of any mean angle, so each layer's embedding is rebuilt from the members'
  positions: ``source @ E_l / size``, with ``source`` the 0/1 membership over the input patches
  (always tracked for ``mixed``) and ``E_l`` timm's embedding of layer l for the input patches.

Both start from timm's own ``rope.get_embed()`` (via ``Eva._pos_embed``), so train-time
coordinate augmentation (shift, jitter, rescale) and patch dropout keep working unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyra_lightning.kernels.attention import ATTENTIONS
from pyra_lightning.merge import MergeFn, merge_source
from pyra_lightning.merge_rules import Matcher, Merger
from pyra_lightning.modulation import PyraModulation
from pyra_lightning.patch_common import (
    Family,
    TokenState,
    check_pooling,
    dropout,
    fused_or_separate_qkv,
    linear,
    merge_metric,
    mlp_forward,
    mlp_input_dtype,
    pool_tokens,
    shape_from_modules,
    size_bias,
    with_metric_rows,
)
from pyra_lightning.schedules import ViTShape

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class _MetricAttention:
    """Forward shared by ``EvaAttention`` and ``AttentionRope``, returning the keys of the merge metric too.

    Modifications relative to timm:
     - the fused ``qkv`` goes through ``patch_common.linear`` (timm calls ``F.linear`` on its
       weight when ``q_bias``/``v_bias`` exist), so a PEFT layer on it takes effect, with the
       same arithmetic as timm's for the frozen part;
     - ``forward_metric(x, rope, size)`` adds ``log(size)`` over keys (proportional attention) and
       returns ``(out, k)``, the keys (B, H_kv, N, hd) after LoRA and k-norm and before
       rotation, whose mean over (key/value) heads is the similarity metric of eq. 3, taken by
       the block only where it merges (``patch_common.merge_metric``). The keys are taken before
       rotation so that similarity measures content, not position. After ``fold_metric`` it
       returns the (B, N, hd) metric that the key projection computed instead;
     - the attention itself runs on the kernel named by ``attention``
       (``kernels.attention.ATTENTIONS``), except under a caller's own mask or ``is_causal``,
       which take timm's own path (SDPA, or its explicit softmax when ``fused_attn`` is off).
    """

    attention: str = "sdpa"  # set by apply_merging
    metric_channels: int = 0  # > 0: the key projection also computes the merge metric (``fold_metric``)

    def _attend(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        size: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        heads = self.num_heads
        kv_heads = getattr(self, "num_kv_heads", heads)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        metric, widths = None, [kv_heads * self.head_dim, self.metric_channels]  # k's and the metric's
        if self.qkv is not None:
            q_bias = getattr(self, "q_bias", None)
            if q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((q_bias, self.k_bias, self.v_bias))
                # timm's own arithmetic either way (plus a PEFT layer's update, if any)
                separate = self.qkv_bias_separate
                qkv = self.qkv(x) + qkv_bias if separate else linear(self.qkv, x, qkv_bias)
            if self.metric_channels:  # the folded metric's columns follow q, k and v (views)
                qkv, metric = qkv.split([3 * widths[0], widths[1]], dim=-1)
            q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        else:
            q = self.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)  # (B, H, N, hd)
            k = self.k_proj(x)  # (B, N, H_kv hd [+ metric_channels])
            if self.metric_channels:
                k, metric = k.split(widths, dim=-1)
            k = k.reshape(B, N, kv_heads, -1).transpose(1, 2)  # (B, H_kv, N, hd)
            v = self.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        keys = k if metric is None else metric  # (B, H_kv, N, hd) before rotation, or (B, N, hd)
        if rope is not None:
            npt, half = self.num_prefix_tokens, self.rotate_half
            q = torch.cat(
                [q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2
            ).type_as(v)
            k = torch.cat(
                [k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2
            ).type_as(v)
        if kv_heads != heads:  # grouped-query attention: head h reads kv head h // groups, as timm
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        if attn_mask is None and not is_causal and (self.fused_attn or self.attention != "sdpa"):
            out = ATTENTIONS[self.attention](q, k, v, size, self.attn_drop.p if self.training else 0.0)
            return self._project(out, gate, B, N), keys
        bias = size_bias(size, q.dtype) if attn_mask is None else attn_mask  # a caller's mask: SDPA
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=bias,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, bias, is_causal=is_causal))
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self._project(out, gate, B, N), keys

    def _project(self, out: torch.Tensor, gate: torch.Tensor | None, B: int, N: int) -> torch.Tensor:
        """(B, H, N, hd) heads -> (B, N, C): timm's norm, gate, output projection and dropout."""
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return dropout(self.proj_drop, self.proj(out))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """timm's signature, for blocks that are not (yet) patched for merging."""
        return self._attend(x, rope, None, attn_mask, is_causal)[0]

    def forward_metric(
        self, x: torch.Tensor, rope: torch.Tensor | None, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._attend(x, rope, size)


class PyraEvaAttention(_MetricAttention, EvaAttention):  # type: ignore[misc]
    """timm ``EvaAttention`` with ``forward_metric`` (see ``_MetricAttention``)."""


class PyraAttentionRope(_MetricAttention, AttentionRope):  # type: ignore[misc]
    """timm ``AttentionRope`` (grouped-query attention included) with ``forward_metric``."""


def _rope_rows(rope: torch.Tensor, batch: int, num_prefix_tokens: int) -> torch.Tensor:
    """timm's shared rope, (Np, R) or (B|1, H', Np, R), as per-token rows (B, N, H'·R), prefix rows 0."""
    if rope.ndim == 2:
        rows = rope.unsqueeze(0).expand(batch, -1, -1)
    elif rope.ndim == 4:
        rows = rope.expand(batch, -1, -1, -1).transpose(1, 2).flatten(2)
    else:
        raise ValueError(f"rotary embedding of shape {tuple(rope.shape)}: expected (N, R) or (B, H, N, R)")
    prefix = rows.new_zeros(batch, num_prefix_tokens, rows.shape[-1])
    return torch.cat([prefix, rows], dim=1)


def _rows_to_rope(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-token rows (B, n, H'·R) back to a tensor that broadcasts like timm's rope: (B, H', n, R)."""
    heads = 1 if like.ndim == 2 else like.shape[1]
    return rows.view(rows.shape[0], rows.shape[1], heads, -1).transpose(1, 2)


class _MergingBlock:
    """Merge step shared by ``PyraEvaBlock`` and ``PyraEvaBlockPostNorm``."""

    matcher: Matcher
    merger: Merger
    merge_r: int
    prop_attn: bool
    trace_source: bool
    num_prefix_tokens: int
    pyra: PyraModulation | None
    rope_mode: str | None  # "shared": merged alongside tokens; "per_layer": rebuilt from sources

    def _merge(
        self,
        x: torch.Tensor,
        branch: torch.Tensor,
        keys: torch.Tensor,
        state: TokenState,
        rope: torch.Tensor | None,
        norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, TokenState, torch.Tensor | None]:
        """``x + branch`` (the residual stream and the attention branch, (B, N, C) each), merged
        by ``merge_r``; a merger that ``fuses_residual`` gets them apart and adds them itself.
        The third result is ``norm`` of the merged tokens where a merger that ``fuses_norm``
        wrote it (``norm`` given: the pre-norm block's norm2), else ``None``."""
        if self.merge_r == 0:
            return x + branch, state, None
        npt = self.num_prefix_tokens
        merge, _ = self.matcher(merge_metric(keys), self.merge_r, npt)
        fused = getattr(self.merger, "fuses_residual", False) and not self.trace_source
        if not fused:
            x = x + branch
        source = merge_source(merge, x, state.source) if self.trace_source else None
        normed = None
        if fused and norm is not None and getattr(self.merger, "fuses_norm", False):
            x, size, normed = self.merger.merge_and_norm(  # type: ignore[attr-defined]
                merge, branch, state.size, self.pyra, x, norm, mlp_input_dtype(self.mlp, x)
            )
        elif fused:  # x + branch is never written whole
            x, size = self.merger(merge, branch, state.size, modulate=self.pyra, residual=x)
        else:
            x, size = self.merger(merge, x, state.size, modulate=self.pyra)  # (B, N - merge_r, C)
        merged_rope = None
        if self.rope_mode == "shared" and rope is not None:
            rows = state.rope if state.rope is not None else _rope_rows(rope, x.shape[0], npt)
            merged_rope = self._merged_rope(merge, rows, state.size, size)  # (B, N - merge_r, R)
        return x, TokenState(size=size, source=source, rope=merged_rope), normed

    def _merged_rope(
        self, merge: MergeFn, rows: torch.Tensor, size: torch.Tensor | None, merged_size: torch.Tensor
    ) -> torch.Tensor:
        """Shared rotary embeddings merged as the tokens are: the size-weighted mean of each merged
        token's members (see the module). A merger with a ``weighted_mean`` of its own (the Triton
        merger: one launch; ``merge_rules``) takes it where it can.

        Args:
            merge: The block's ``merge`` (its matcher's).
            rows: Per-token embeddings (B, N, R), before the merge.
            size: The tokens' sizes (B, N, 1) before the merge; ``None``: all ones.
            merged_size: The merged tokens' sizes (B, N - merge_r, 1), the merger's.

        Returns:
            (B, N - merge_r, R) embeddings, in ``rows``' dtype.
        """
        mean = getattr(self.merger, "weighted_mean", None)
        merged = None if mean is None else mean(merge, rows, size)
        if merged is not None:
            return merged
        weight = size if size is not None else torch.ones_like(rows[..., :1])
        rope_sum = merge((rows * weight).to(rows.dtype), mode="sum")  # (B, N - merge_r, R)
        return rope_sum / merged_size.to(rope_sum.dtype)


class PyraEvaBlock(_MergingBlock, EvaBlock):  # type: ignore[misc]
    """timm ``EvaBlock`` (pre-norm) that merges tokens between attention and MLP.

    Modifications relative to timm:
     - ``forward(x, state, rope) -> (x, state)`` carries token sizes, sources and merged rotary
       embeddings explicitly; ``rope`` is this layer's embedding for the current tokens;
     - after ``x + drop_path1(gamma_1 * attn)``, merges ``merge_r`` tokens with the block's
       ``matcher`` and ``merger`` (by default bipartite matching and the size-weighted average,
       eqs. 2-3) and PYRA (eqs. 4-7) when ``self.pyra`` is set.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: TokenState | None = None, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TokenState]:
        state = TokenState() if state is None else state
        x_attn, keys = self.attn.forward_metric(self.norm1(x), rope, state.size if self.prop_attn else None)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x, state, normed = self._merge(x, self.drop_path1(x_attn), keys, state, rope, self.norm2)
        x_mlp = mlp_forward(self.mlp, self.norm2(x) if normed is None else normed)
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp), state


class PyraEvaBlockPostNorm(_MergingBlock, EvaBlockPostNorm):  # type: ignore[misc]
    """timm ``EvaBlockPostNorm`` that merges tokens between attention and MLP (see ``PyraEvaBlock``)."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: TokenState | None = None, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TokenState]:
        state = TokenState() if state is None else state
        x_attn, keys = self.attn.forward_metric(x, rope, state.size if self.prop_attn else None)
        x, state, _ = self._merge(x, self.drop_path1(self.norm1(x_attn)), keys, state, rope)
        return x + self.drop_path2(self.norm2(self.mlp(x))), state


class MergingEva(Eva):
    """Mixin placed in front of the model's own class (``Eva`` or a subclass).

    Modifications relative to timm:
     - ``forward_tokens(x) -> (tokens, TokenState)`` runs the blocks with explicit state and
       gives every block its layer's rotary embedding for the current (merged) tokens;
       ``forward_features`` returns its tokens, so timm's API keeps working;
     - ``forward_head(x, size=...)`` pools with token sizes (``patch_common.pool_tokens``);
     - activation checkpointing checkpoints each block with its state.
    """

    def layer_rope(self, rot: torch.Tensor | None, index: int, state: TokenState) -> torch.Tensor | None:
        """Block ``index``'s rotary embedding for the current tokens (timm's own before any merge)."""
        if rot is None:
            return None
        rope = rot[index] if self.rope_mixed else rot
        if state.size is None:
            return rope
        npt = self.num_prefix_tokens
        if self.rope_mixed:  # per-layer frequencies: mean over the members' positions in this layer
            members = state.source[:, npt:, npt:].to(rope.dtype).unsqueeze(1)  # (B, 1, n, Np)
            return (members @ rope) / state.size[:, npt:].to(rope.dtype).unsqueeze(1)  # (B, H, n, R)
        return _rows_to_rope(state.rope[:, npt:], rope)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        x = self.patch_embed(x)
        x, rot = self._pos_embed(x)
        x = self.norm_pre(x)  # (B, N, C)
        state = TokenState()
        for index, block in enumerate(self.blocks):
            rope = self.layer_rope(rot, index, state)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, state = checkpoint(block, x, state, rope, use_reentrant=False)
            else:
                x, state = block(x, state, rope)
        return self.norm(x), state

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_tokens(x)[0]

    def forward_head(  # type: ignore[override]
        self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
    ) -> torch.Tensor:
        if size is None:
            return super().forward_head(x, pre_logits=pre_logits)
        # Eva's attention pool sees all tokens, its average pools leave the prefix out.
        pooled = pool_tokens(self, x, size, include_prefix_avg=False, include_prefix_attn=True)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, state = self.forward_tokens(x)
        return self.forward_head(x, size=state.size)


def check_eva(name: str, model: Eva) -> None:
    """Assert the structure the Eva patch relies on; raise ``ValueError`` naming what differs."""
    check_pooling(name, model)
    if model.rope is not None and not hasattr(model.rope, "get_embed"):
        raise ValueError(
            f"{name}: rope is {type(model.rope).__name__}, expected one of timm's rotary embeddings"
        )
    for index, block in enumerate(model.blocks):
        where = f"{name}: blocks[{index}]"
        if not isinstance(block, EvaBlock | EvaBlockPostNorm):
            raise ValueError(
                f"{where} is {type(block).__name__}, expected timm's EvaBlock or EvaBlockPostNorm "
                "(attention, then MLP, each in a residual branch)"
            )
        attn = block.attn
        if not isinstance(attn, EvaAttention | AttentionRope):
            raise ValueError(
                f"{where}.attn is {type(attn).__name__}, expected timm's EvaAttention or AttentionRope"
            )
        fused = isinstance(attn.qkv, nn.Linear)
        separate = all(isinstance(getattr(attn, p, None), nn.Linear) for p in _PROJECTIONS)
        if fused == separate:
            raise ValueError(
                f"{where}.attn: expected either a fused qkv or separate q_proj/k_proj/v_proj (nn.Linear)"
            )
        if attn.num_prefix_tokens != model.num_prefix_tokens:
            raise ValueError(
                f"{where}.attn skips rotation for {attn.num_prefix_tokens} prefix tokens but the model has "
                f"{model.num_prefix_tokens}"
            )


def patch_attention(model: Eva) -> None:
    """Give every attention ``forward_metric`` and a fused qkv called as a module (timm's signature
    kept), so a PEFT layer on ``qkv`` takes effect next to ``q_bias``/``v_bias``."""
    for block in model.blocks:
        if isinstance(block.attn, AttentionRope):
            block.attn.__class__ = PyraAttentionRope
        else:
            block.attn.__class__ = PyraEvaAttention


def patch_eva(model: Eva) -> None:
    """Swap the model's, blocks' and attentions' classes; ``apply_merging`` sets the block attributes."""
    if not isinstance(model, MergingEva):
        base = type(model)
        model.__class__ = type(f"Merging{base.__name__}", (MergingEva, base), {})
    patch_attention(model)
    rope_mode = None if model.rope is None else ("per_layer" if model.rope_mixed else "shared")
    for block in model.blocks:
        block.__class__ = PyraEvaBlockPostNorm if isinstance(block, EvaBlockPostNorm) else PyraEvaBlock
        block.rope_mode = rope_mode


def eva_shape(model: Eva) -> ViTShape:
    """``model_shape`` of a timm Eva.

    Per-layer (``mixed``) rotary embeddings are rebuilt after a merge (``MergingEva.layer_rope``):
    (n, Np) memberships times each head's (Np, 2 head_dim) embedding, a matmul the FLOPs model
    counts as ``rope_token_flops`` per patch token. Left out, ``low`` on
    ``vit_small_patch16_rope_mixed_224`` measured 0.536 of the unmerged FLOPs instead of 0.500.
    """
    attn = model.blocks[0].attn
    shape = shape_from_modules(model, attn_dim=attn.num_heads * attn.head_dim)
    if model.rope is None or not model.rope_mixed:
        return shape
    rope_width = model.rope.num_heads * 2 * (model.rope.dim // model.rope.num_heads)  # H x (sin, cos)
    return dataclasses.replace(shape, rope_token_flops=2 * shape.num_patches * rope_width)


def fold_metric(model: Eva) -> int:
    """For deployment: each merging block's key projection also computes the merge metric.

    As ``patch_vit.fold_metric`` does for ViTs: the metric of eq. 3, the mean over key/value heads
    of the keys before rotation, is one more linear map of the block's input where there is no
    k-norm (``patch_common.with_metric_rows``), appended as ``head_dim`` more outputs of the fused
    ``qkv`` or of ``k_proj`` (grouped-query attention: the mean over the ``num_kv_heads``). It
    replaces a kernel per merging layer, a pass over the keys. A fused ``qkv`` whose bias timm
    keeps apart (EVA-02's ``q_bias``/``k_bias``/``v_bias``) gets that bias in the copy, which also
    spares the bias ``cat`` of every forward; with ``qkv_bias_separate`` the sum is then taken
    inside the product rather than after it. Equal to the keys' mean and to timm's projection up
    to rounding. Changes, in place, the merging blocks whose projection is a plain ``nn.Linear``
    (PEFT layers folded) and whose ``k_norm`` is the identity; the model's state dict changes
    shape, so fold a copy.

    Returns:
        How many blocks were folded.
    """
    folded = 0
    for block in model.blocks:
        attn = block.attn
        fused = attn.qkv is not None
        layer = attn.qkv if fused else attn.k_proj
        if (
            getattr(block, "merge_r", 0) <= 0
            or type(layer) is not nn.Linear
            or not isinstance(attn.k_norm, nn.Identity)
            or attn.metric_channels
        ):
            continue
        heads, head_dim = getattr(attn, "num_kv_heads", attn.num_heads), attn.head_dim
        apart = fused and getattr(attn, "q_bias", None) is not None  # timm's bias, kept apart
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach() if apart else None
        start = heads * head_dim if fused else 0  # fused: k's rows follow q's
        wide = with_metric_rows(layer, start, heads, head_dim, bias)
        if apart:  # only once the copy holds it
            attn.q_bias = attn.k_bias = attn.v_bias = None
        if fused:
            attn.qkv = wide
        else:
            attn.k_proj = wide
        attn.metric_channels = head_dim
        folded += 1
    return folded


FAMILY = Family(
    name="eva",
    check=check_eva,
    shape=eva_shape,
    patch=patch_eva,
    peft_targets=fused_or_separate_qkv,
    prepare_peft=patch_attention,
    traces_source=lambda model: model.rope is not None and model.rope_mixed,
    fold_metric=fold_metric,
)
