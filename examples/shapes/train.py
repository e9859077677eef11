"""Train the small model that ships with fastdiff (fastdiff/data/shapes-model) and its two add-ons.

    python -m examples.shapes.train [--out fastdiff/data/shapes-model] [--work DIR] [--seed 0]
                                    [--stages vae,unet,hypernetwork,embedding] [--eval-every N]
                                    [--recipe 1h|2h] [--device cpu|cuda]

Stages, each reading the previous one's output from --work (so one can be re-run alone):
  vae           a KL autoencoder (f8: 64x64x3 -> 8x8x4, no mid-block attention) on whole
                shapes pictures, the shapes' pixels weighted up; then a per-channel latent shift
                and scale folded into quant_conv / post_quant_conv
  unet          UNet (cross-attention) and CLIP text encoder together, v-prediction, on the
                train split (filled and outlined shapes, captions say which; 1 in 10 captions
                leaves the position out), 10% empty captions for classifier-free guidance; the
                second phase adds a position loss on the text encoder's output (see
                train_unet); the saved weights are the EMA
  hypernetwork  an A1111 hypernetwork (modules for the text context's width) that draws shapes
                outlined when the caption does not ask for it: trained on outlined pictures whose
                captions leave the style out, everything else frozen
  embedding     a textual-inversion vector for the colour word "pink", which neither the text
                encoder nor the UNet saw: trained on the novel split, everything else frozen

Everything is fastdiff's own model code on the torch reference ops, with autograd, fp32, on the
CPU (`--device cuda` moves the models and batches, not the random draws), seeded (repeatable
on one machine, not bitwise across machines). The folder is written in diffusers layout with
fp16 safetensors (15 MB), the hypernetwork as A1111's .pt and the embedding as A1111's
.safetensors. `python -m examples.shapes.evaluate` scores the result; examples/shapes/README.md
has the recipe, its times and the scores. The shipped weights are the default recipe (1h)
with `--seed 4`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from examples.shapes import data as D

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "..", "fastdiff", "data", "shapes-model")

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 1, "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8,
    "sample_size": D.SIZE, "scaling_factor": 0.18215,  # SD 1.x's; the per-channel scale is folded in
    "mid_block_add_attention": False,  # fully convolutional, so it can train on crops
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": D.SIZE // 8, "in_channels": 4,
    "out_channels": 4, "layers_per_block": 1, "block_out_channels": [48, 96, 96],
    "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": 64,
}
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "timestep_spacing": "leading", "steps_offset": 1,
}

# The constants below are recipe "2h", the longer one (about 2 hours on a 2-core CPU). RECIPES
# (after them) overrides some of them; the shipped weights are recipe "1h" (the default), seed 4.
VAE_PHASES, VAE_BATCH, VAE_IMAGES = ((2000, 1e-3), (3000, 5e-4)), 16, 16384  # (steps, peak lr)
# Shape pixels (VAE_FG_BOX: their bounding box; VAE_FG_FILL: with the holes they enclose) count
# 1 + VAE_FG_WEIGHT times in the VAE's loss.
VAE_FG_WEIGHT, VAE_FG_BOX, VAE_FG_FILL, VAE_LOGVAR_INIT = 10.0, False, False, -10.0
# After VAE_PHASES, up to VAE_EXTRA_MAX more phases of VAE_EXTRA (steps, peak lr) run while the
# held-out reconstructions (vae_recon_score's "all") are below VAE_TARGET (None: no extra phases).
# Some seeds' VAEs start slowly and end a fixed schedule far behind the others.
VAE_TARGET, VAE_EXTRA, VAE_EXTRA_MAX = None, (1500, 5e-4), 2
# UNet phases: (steps, peak lr, cosine length, position-loss weight). Phase 0 of recipe 2h ends at
# 3500 of its 4000-step schedule (the held-out position score stays at chance without the probe).
UNET_PHASES, UNET_BATCH, UNET_IMAGES = ((3500, 1e-3, 4000, 0.0), (1200, 5e-4, 1200, 0.1), (800, 3e-4, 800, 0.1)), 128, 32768
# The v loss on latent pixels whose 8x8 patch holds part of the shape counts 1 + this many times
# (0: every latent pixel alike).
UNET_FG_WEIGHT = 0.0
# Every MIXED_EVERY-th UNet picture is drawn "mixed" (half of those outlined: 3 -> 1 in 6).
MIXED_EVERY = 3
# Whether the position probe (train_unet) has a second head that must name the caption's style.
STYLE_PROBE = False
HN_STEPS, HN_BATCH, HN_IMAGES = 600, 64, 4096
HN_LAYERS, HN_LR = (1, 2, 1), 1e-3  # A1111's layer structure (widths in units of the context's)
# Every HN_EMPTY_EVERY-th hypernetwork caption is empty (0: none). The pipeline applies the
# hypernetwork to the unconditional context too, so without them guidance pushes away from a
# context the hypernetwork was never trained on.
HN_EMPTY_EVERY = 0
EMB_STEPS, EMB_BATCH, EMB_IMAGES = 300, 64, 4096
EMB_VECTORS, EMB_LR = 1, 5e-3  # vectors the word stands for (A1111's "number of vectors per token")
EMB_FG_WEIGHT = None  # the embedding stage's foreground weight (None: UNET_FG_WEIGHT's)
EMBEDDING_WORD = "pink"
# --recipe NAME sets these constants before any stage runs ("2h": the constants as above).
RECIPES = {
    "2h": {},
    # The shipped weights' recipe (seed 4): 46-111 min on a 2-core CPU depending on the machine;
    # at CFG 3 its weights pass every test on seeds 1, 2 and 4, not on seed 0 (the base model's
    # purple) or seed 3 (pink 0.66).
    "1h": {
        "VAE_PHASES": ((3000, 1e-3),), "VAE_FG_FILL": True,
        "UNET_PHASES": ((2700, 1e-3, 2700, 0.1), (600, 3e-4, 600, 0.1)), "UNET_FG_WEIGHT": 4.0,
        "MIXED_EVERY": 1, "STYLE_PROBE": True, "HN_EMPTY_EVERY": 5, "VAE_TARGET": 0.95,
    },
}
DEFAULT_RECIPE = "1h"
# Where models train (--device). Every random draw stays on the CPU's generators and is moved,
# so a run draws the same numbers on any device.
DEVICE = torch.device("cpu")
HYPERNETWORK_NAME = "shapes-outlined"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def cosine_lr(step, total, peak, warmup=100, floor=0.02):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------- data


def _images(indices, seed, split, style, mention_style=True):
    """-> uint8 [N, 3, 64, 64], captions, attributes (N may be 0)."""
    imgs, caps, attrs = [np.empty((0, D.SIZE, D.SIZE, 3), np.uint8)], [], []
    for i in indices:
        im, cap, a = D.sample(int(i), seed, split, style, mention_style)
        imgs.append(im[None])
        caps.append(cap)
        attrs.append(a)
    return torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).contiguous(), caps, attrs


def vae_images(n, seed):
    """Pictures for the VAE: the train split, filled and outlined, and 1 in 8 from the novel
    split (the VAE is a codec; the text encoder and UNet never see the novel colour)."""
    out = np.empty((n, D.SIZE, D.SIZE, 3), np.uint8)
    for i in range(n):
        out[i] = D.sample(i, seed, "novel" if i % 8 == 7 else "train", "mixed")[0]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def to_unit(x):
    return x.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------- VAE


def zero_init_residuals(model):
    """Zero each residual branch's last layer (resnet conv2, attention output), so every block
    starts as the identity and the deep stack trains like a shallow one at first (skip-init)."""
    from fastdiff.models.unet import Attention, ResnetBlock2D

    for m in model.modules():
        last = m.conv2 if isinstance(m, ResnetBlock2D) else m.to_out[0] if isinstance(m, Attention) else None
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
    return model


def _box(fg):
    """The bounding box of each mask in fg [..., H, W] (bool), as a mask of the same shape."""
    return fg.any(dim=-1, keepdim=True) & fg.any(dim=-2, keepdim=True)


def _fill_holes(fg):
    """fg [..., H, W] (bool) with every region it encloses added: the pixels not reachable from
    the image border through 4-connected pixels outside fg."""
    outside = torch.zeros_like(fg)
    for edge in (outside[..., 0, :], outside[..., -1, :], outside[..., :, 0], outside[..., :, -1]):
        edge.fill_(True)
    outside &= ~fg
    while True:
        grown = outside.clone()
        grown[..., 1:, :] |= outside[..., :-1, :]
        grown[..., :-1, :] |= outside[..., 1:, :]
        grown[..., :, 1:] |= outside[..., :, :-1]
        grown[..., :, :-1] |= outside[..., :, 1:]
        grown &= ~fg
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def shape_weight(x):
    """Per-pixel loss weight [B, 1, H, W] for pictures x in [-1, 1]: the shape covers ~6% of a
    picture, so its pixels (those off the commonest colour) count VAE_FG_WEIGHT + 1 times, or the
    background alone pays off and the shape is learned last. With VAE_FG_BOX the whole bounding
    box of those pixels does: an outline's inside too, which the shape's pixels alone leave at
    weight 1, so the VAE learned to fill small outlined triangles in (half of them read filled).
    With VAE_FG_FILL the shape's pixels and the holes they enclose do: an outline's inside, but
    not the box's corners (a filled shape weighs as without either)."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = (x - bg).abs().amax(dim=1, keepdim=True) > 0.05  # [B, 1, H, W]
    if VAE_FG_BOX:
        fg = _box(fg)
    elif VAE_FG_FILL:
        fg = _fill_holes(fg)
    return 1.0 + VAE_FG_WEIGHT * fg.float()


def vae_recon_score(vae, n=200, seed=5):
    """The checker's score on n held-out pictures (filled and outlined) after encoding and
    decoding them: the ceiling for everything generated through this VAE."""
    from examples.shapes.checker import score

    ev = [D.sample(i, seed, "heldout", "mixed") for i in range(n)]
    x = torch.from_numpy(np.stack([e[0] for e in ev])).permute(0, 3, 1, 2)
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        y = vae.decode(vae.encode(to_unit(x.to(_device(vae)))).chunk(2, dim=1)[0]).cpu()
    vae.train(was_training)
    out = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
    return score(list(out), [e[2] for e in ev])


def vae_phases():
    """VAE_PHASES, then the VAE_EXTRA phases train_vae may add (it stops when VAE_TARGET is met)."""
    extra = VAE_EXTRA_MAX if VAE_TARGET is not None else 0
    return tuple(VAE_PHASES) + (tuple(VAE_EXTRA),) * extra


def train_vae(work, seed, first_phase=0):
    """VAE_PHASES in order (each a fresh Adam and cosine schedule) on whole 64x64 pictures
    (channels_last: ~20% faster convolutions on the CPU), then extra phases while the held-out
    reconstructions are below VAE_TARGET (vae_phases). The raw weights are kept after each
    phase (vae_raw.pt; `first_phase` resumes from it), then the latent statistics are folded in."""
    from fastdiff.models.vae import AutoencoderKL

    torch.manual_seed(seed)
    vae = zero_init_residuals(AutoencoderKL(VAE_CONFIG))
    imgs = vae_images(VAE_IMAGES, seed)
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {len(imgs)} images")
    with torch.no_grad():  # start with a narrow posterior: early noise would drown the shapes
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = VAE_LOGVAR_INIT
    raw = os.path.join(work, "vae_raw.pt")
    if first_phase:
        vae.load_state_dict(torch.load(raw, weights_only=True))
    vae.to(DEVICE, memory_format=torch.channels_last)
    recon = None  # the held-out reconstruction score after the last phase trained here
    for phase, (steps, lr) in enumerate(vae_phases()):
        if phase < first_phase:
            continue
        if phase >= len(VAE_PHASES):
            if recon is None:
                recon = vae_recon_score(vae)["all"]
            if recon >= VAE_TARGET:
                break
            log(f"vae: held-out reconstructions {recon:.2f} < {VAE_TARGET}: extra phase {phase}")
        opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
        g = torch.Generator().manual_seed(seed + 2 * phase)
        t0 = time.time()
        for step in range(steps):
            for pg in opt.param_groups:
                pg["lr"] = cosine_lr(step, steps, lr, warmup=50)
            x = to_unit(imgs[torch.randint(len(imgs), (VAE_BATCH,), generator=g)].to(DEVICE))
            x = x.contiguous(memory_format=torch.channels_last)
            mean, logvar = vae.encode(x).chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(DEVICE)
            y = vae.decode(z)
            rec = (shape_weight(x) * ((y - x).square() + 0.1 * (y - x).abs())).mean()
            kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
            loss = rec + 1e-5 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"vae phase {phase} step {step} rec {rec.item():.5f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)")
            if step % 1000 == 999 or step == steps - 1:
                res = vae_recon_score(vae)
                recon = res["all"]
                log(f"vae phase {phase} step {step + 1}: held-out reconstructions "
                    + " ".join(f"{k} {v:.2f}" for k, v in res.items() if k != "n"))
        torch.save(_cpu(vae.state_dict()), raw)
    vae.eval()
    normalise_latents(vae, _images(range(2048), seed + 13, "train", "filled")[0])
    torch.save(_cpu(vae.state_dict()), os.path.join(work, "vae.pt"))
    return vae


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _device(module) -> torch.device:
    return next(module.parameters()).device


def load_vae(work):
    from fastdiff.models.vae import AutoencoderKL

    vae = AutoencoderKL(VAE_CONFIG)
    vae.load_state_dict(torch.load(os.path.join(work, "vae.pt"), weights_only=True))
    return vae.eval()


@torch.no_grad()
def normalise_latents(vae, imgs):
    """Fold a per-channel shift and scale into quant_conv / post_quant_conv so the latents of the
    training pictures have zero mean and, times SD 1.x's scaling_factor, unit variance per channel
    (so single-file SD 1.x loaders need no special factor). The decoder sees exactly what it saw
    before: post_quant_conv(z) == old post_quant_conv(z * s + mu)."""
    means = encode_set(vae, imgs)[0] / VAE_CONFIG["scaling_factor"]
    mu = means.mean(dim=(0, 2, 3))  # [4]
    s = means.std(dim=(0, 2, 3)) * VAE_CONFIG["scaling_factor"]
    mu, s = mu.to(_device(vae)), s.to(_device(vae))
    c = VAE_CONFIG["latent_channels"]
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= s[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mu) / s
    q.bias[c:] -= 2 * torch.log(s)  # logvar of z/s
    p.bias += (p.weight[:, :, 0, 0] * mu[None, :]).sum(1)
    p.weight *= s[None, :, None, None]
    log(f"latents: per-channel mean {mu.tolist()} std {s.tolist()} folded into the VAE")


@torch.no_grad()
def encode_set(vae, imgs):
    """-> scaled latent means and stds [N, 4, 8, 8] of uint8 pictures (what the UNet sees)."""
    ms, ss = [], []
    for i in range(0, len(imgs), 256):
        mean, logvar = vae.encode(to_unit(imgs[i:i + 256].to(_device(vae)))).cpu().chunk(2, dim=1)
        sf = VAE_CONFIG["scaling_factor"]
        ms.append(mean * sf)
        ss.append(torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * sf)
    return torch.cat(ms), torch.cat(ss)


# ---------------------------------------------------------------------------- text


class Vocab:
    """The CLIP tokens the shapes captions use, as a small trainable table: only those rows of the
    49408-row embedding ever get a gradient, so training them alone is the same thing, cheaper."""

    def __init__(self):
        from fastdiff.tokenizer import default_tokenizer

        self.tok = default_tokenizer()
        words = set()
        for c in D.COLOURS + D.SHAPES + D.POSITIONS:
            words.update(c.split())
        words.update(["a", "an", "on", "background", ",", "in", "the", "centre", "outlined"])
        ids = {self.tok.bos_id, self.tok.eos_id, self.tok.pad_id}
        for w in words:
            ids.update(self.tok.encode(w))
        self.global_ids = torch.tensor(sorted(ids))
        self.local = {int(g): i for i, g in enumerate(self.global_ids)}
        self._cache = {}

    def ids(self, captions):
        """captions -> local ids [B, 77], tokenized exactly as the pipeline does."""
        from fastdiff import prompts as P

        rows = []
        for c in captions:
            if c not in self._cache:
                g = P.tokenize_batch([c], self.tok).ids[0].tolist()
                self._cache[c] = [self.local[i] for i in g]
            rows.append(self._cache[c])
        return torch.tensor(rows)


def alphas_cumprod():
    """The model's training schedule, as the sampling core computes it from the scheduler
    config the model ships with (float64 there, float32 here)."""
    from fastdiff._core import alphas_cumprod as schedule

    c = SCHEDULER_CONFIG
    return torch.tensor(schedule(c["beta_schedule"], c["beta_start"], c["beta_end"], c["num_train_timesteps"], []),
                        dtype=torch.float32)


def v_loss(unet, z, ctx, g, acp, weight=None):
    """The v-prediction loss at uniform timesteps (k-diffusion's CompVisVDenoiser's target);
    `weight` [B, 1, h, w] weighs latent pixels (normalised to mean 1 over the batch)."""
    t = torch.randint(0, 1000, (z.shape[0],), generator=g)
    a, s = acp[t].sqrt()[:, None, None, None].to(z.device), (1 - acp[t]).sqrt()[:, None, None, None].to(z.device)
    n = torch.randn(z.shape, generator=g).to(z.device)
    pred = unet(a * z + s * n, t.float().to(z.device), ctx)
    if weight is None:
        return F.mse_loss(pred, a * n - s * z)
    weight = weight.to(z.device)
    return (weight * (pred - (a * n - s * z)).square()).mean() / weight.mean()


def latent_weight(imgs, fg_weight=None):
    """Per-latent-pixel loss weights [N, 1, 8, 8] of uint8 pictures [N, 3, 64, 64]: 1 + fg_weight
    (default UNET_FG_WEIGHT)
    where the latent pixel's 8x8 patch meets the shape's bounding box (of the pixels off the
    corner's colour, the background: no shape reaches a corner; the box, so an outline's inside
    counts too). The shape covers ~12% of the latent, so without this the background, learned
    early, keeps most of the loss, and details like outlines come last."""
    bg = imgs[:, :, :1, :1].int()
    fg = (imgs.int() - bg).abs().amax(dim=1) > 24  # [N, 64, 64]
    w = UNET_FG_WEIGHT if fg_weight is None else fg_weight
    return 1.0 + w * F.max_pool2d(_box(fg)[:, None].float(), 8)


def unet_data(vae, n, seed, split="train", style=None, mention_style=True, fg_weight=None):
    """Latent means/stds, captions and latent loss weights (latent_weight; None where the weight
    is 0: every latent pixel alike) of n pictures. style
    None: the base model's mix, 1 in 2 * MIXED_EVERY outlined and 1 in 10 captions without the
    position clause (the model then places the shape anywhere, so a prompt like the README's
    first command is in its distribution)."""
    idx = range(n)
    if style is None:
        imgs_f, caps_f, _ = _images([i for i in idx if i % MIXED_EVERY], seed, split, "filled", mention_style)
        imgs_m, caps_m, _ = _images([i for i in idx if i % MIXED_EVERY == 0], seed, split, "mixed", mention_style)
        imgs, caps = torch.cat([imgs_f, imgs_m]), caps_f + caps_m
        # 1 in 10 without the position: "a red circle on a blue background"
        caps = [c.rsplit(",", 1)[0] if i % 10 == 9 else c for i, c in enumerate(caps)]
    else:
        imgs, caps, _ = _images(idx, seed, split, style, mention_style)
    mean, std = encode_set(vae, imgs)
    w = UNET_FG_WEIGHT if fg_weight is None else fg_weight
    return mean, std, caps, latent_weight(imgs, w) if w else None


class EMA:
    def __init__(self, tensors, decay):
        self.decay = decay
        self.tensors = tensors
        self.shadow = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, t in zip(self.shadow, self.tensors):
            s.lerp_(t.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for s, t in zip(self.shadow, self.tensors):
            t.copy_(s)


def build_text_unet(seed):
    from fastdiff.models.clip import CLIPTextEncoder
    from fastdiff.models.unet import UNet2DCondition

    torch.manual_seed(seed)
    te = CLIPTextEncoder(TEXT_CONFIG)
    emb = te.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)  # transformers' CLIP init
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)
    unet = zero_init_residuals(UNet2DCondition(UNET_CONFIG))
    torch.nn.init.zeros_(unet.conv_out.weight)  # start from predicting v = 0
    torch.nn.init.zeros_(unet.conv_out.bias)
    return te, unet


def trainable(te, unet, vocab):
    """-> (table, params): the caption tokens' rows of the text encoder's embedding as their own
    parameter (the full 49408-row table frozen), and everything the unet stage trains."""
    table = torch.nn.Parameter(te.text_model.embeddings.token_embedding.weight[vocab.global_ids].clone())
    te.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    return table, [table] + [p for p in te.parameters() if p.requires_grad] + list(unet.parameters())


def train_unet(work, seed, eval_every=0, first_phase=0):
    """UNET_PHASES in order, each a fresh AdamW, EMA and cosine schedule; a phase after the
    first starts from the EMA weights the one before saved (unet_text.pt), as does a resumed
    run (`first_phase`)."""
    vae = load_vae(work)
    mean, std, caps, weight = unet_data(vae, UNET_IMAGES, seed)
    vocab = Vocab()
    te, unet = build_text_unet(seed)
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters; text encoder "
        f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f}M; {len(caps)} latents, "
        f"{len(vocab.global_ids)} tokens")
    acp = alphas_cumprod()
    empty = vocab.ids([""])[0]
    # The position each caption names (9: none), for the auxiliary position loss.
    phrase_index = {D.POSITION_PHRASES[p]: i for i, p in enumerate(D.POSITIONS)}
    pos_label = torch.tensor([phrase_index[c.rsplit(", ", 1)[1]] if ", " in c else 9 for c in caps])
    style_label = torch.tensor([int(" outlined " in c) for c in caps])  # 2: empty caption
    eos = vocab.local[vocab.tok.eos_id]
    for phase, (steps, lr, length, aux_weight) in enumerate(UNET_PHASES):
        if phase < first_phase:
            continue
        if phase:
            te, unet = load_unet_text(work, seed)
            te.train().requires_grad_(True)
            unet.train().requires_grad_(True)
        te.to(DEVICE)
        unet.to(DEVICE)
        table, params = trainable(te, unet, vocab)
        torch.manual_seed(seed + 40 + phase)
        # training only: position (9 + none), then style (filled, outlined, none) if STYLE_PROBE
        probe = torch.nn.Linear(TEXT_CONFIG["hidden_size"], len(D.POSITIONS) + 1 + 3 * STYLE_PROBE).to(DEVICE)
        opt = torch.optim.AdamW(params + list(probe.parameters()), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        ema = EMA(params, 0.999)
        g = torch.Generator().manual_seed(seed + 1 + 2 * phase)
        t0 = time.time()
        for step in range(steps):
            for pg in opt.param_groups:
                pg["lr"] = cosine_lr(step, length, lr)
            idx = torch.randint(len(caps), (UNET_BATCH,), generator=g)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)).to(DEVICE)
            ids = vocab.ids([caps[i] for i in idx.tolist()])
            drop = torch.rand(UNET_BATCH, generator=g) < 0.1
            ids[drop] = empty
            ctx = te(inputs_embeds=table[ids.to(DEVICE)])
            loss = v_loss(unet, z, ctx, g, acp, None if weight is None else weight[idx])
            if aux_weight:
                # The text encoder must say where: a linear probe on the first end-of-text token
                # (CLIP's pooled output; every padding token is one too and sees the whole
                # caption) predicts the position the caption names. Without it the encoder
                # learned to flatten the position words (output difference 0.5 against 10 for a
                # colour word) and the UNet had nothing to place shapes by.
                label = torch.where(drop, 9, pos_label[idx]).to(DEVICE)
                first_eos = (ids == eos).int().argmax(dim=1).to(DEVICE)
                logits = probe(ctx[torch.arange(len(ids), device=DEVICE), first_eos])
                aux = F.cross_entropy(logits[:, :len(D.POSITIONS) + 1], label)
                if STYLE_PROBE:  # the same for "outlined", which the encoder also let fade
                    style = torch.where(drop, 2, style_label[idx]).to(DEVICE)
                    aux = aux + F.cross_entropy(logits[:, len(D.POSITIONS) + 1:], style)
                loss_all = loss + aux_weight * aux
            else:
                loss_all = loss
            opt.zero_grad(set_to_none=True)
            loss_all.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.update(step)
            if step % 100 == 0 or step == steps - 1:
                extra = f" position loss {aux.item():.3f}" if aux_weight else ""
                log(f"unet phase {phase} step {step} loss {loss.item():.4f}{extra} ({time.time() - t0:.0f}s)")
            if step % 500 == 499 or step == steps - 1:
                _save_unet_text(work, te, unet, table, vocab, ema)
                if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
                    evaluate_now(work, f"unet phase {phase} step {step + 1}")


def _save_unet_text(work, te, unet, table, vocab, ema):
    live = [t.detach().clone() for t in ema.tensors]
    ema.copy_to()
    with torch.no_grad():
        te.text_model.embeddings.token_embedding.weight[vocab.global_ids] = table
    torch.save({"text_encoder": _cpu(te.state_dict()), "unet": _cpu(unet.state_dict())},
               os.path.join(work, "unet_text.pt"))
    with torch.no_grad():
        for t, v in zip(ema.tensors, live):
            t.copy_(v)
    log("saved EMA unet + text encoder")


def load_unet_text(work, seed=0):
    te, unet = build_text_unet(seed)
    sd = torch.load(os.path.join(work, "unet_text.pt"), weights_only=True)
    te.load_state_dict(sd["text_encoder"])
    unet.load_state_dict(sd["unet"])
    return te.eval().requires_grad_(False), unet.eval().requires_grad_(False)


def evaluate_now(work, what, n=100):
    """Score the models saved in `work` on n held-out prompts through fastdiff's loader and
    pipeline (the default sampler, 20 steps), to watch training; writes work/eval-model, not --out."""
    import fastdiff
    from examples.shapes.evaluate import heldout

    folder = os.path.join(work, "eval-model")
    export(work, folder, 0)
    t0 = time.time()
    res = heldout(fastdiff.load(folder, device="cpu", dtype=torch.float32), n)
    log(f"{what}: " + " ".join(f"{k} {v:.2f}" for k, v in res.items() if k != "n")
        + f" ({time.time() - t0:.0f}s)")
    return res


# ---------------------------------------------------------------------------- add-ons


def _context_fn(te, vocab):
    cache = {}

    @torch.no_grad()
    def ctx(captions):
        missing = sorted({c for c in captions if c not in cache})
        if missing:
            full = te(input_ids=vocab.global_ids[vocab.ids(missing)].to(_device(te)))
            cache.update(zip(missing, full))
        return torch.stack([cache[c] for c in captions])
    return ctx


def _fit_addon(name, params, lr, steps, batch, seed, unet, mean, std, weight, context):
    """Train `params` (an add-on; the UNet and text encoder stay frozen) on the v loss.
    context(list of picture indices) -> the UNet's context for them."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp, g = alphas_cumprod(), torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, steps, lr, warmup=20)
        idx = torch.randint(len(mean), (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)).to(DEVICE)
        loss = v_loss(unet, z, context(idx.tolist()), g, acp, None if weight is None else weight[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")


def train_hypernetwork(work, out, seed):
    from fastdiff.models.hypernetwork import Hypernetwork, HypernetworkModule

    vae, (te, unet), vocab = load_vae(work), load_unet_text(work, seed), Vocab()
    te.to(DEVICE)
    unet.to(DEVICE)
    mean, std, caps, weight = unet_data(vae, HN_IMAGES, seed + 7, style="outlined", mention_style=False)
    caps = empty_every(caps, HN_EMPTY_EVERY)
    dim = TEXT_CONFIG["hidden_size"]
    torch.manual_seed(seed + 2)
    mods = {dim: tuple(HypernetworkModule(dim, list(HN_LAYERS), "relu", False, False, None) for _ in range(2))}
    for m in mods[dim]:  # A1111's "Normal" initialisation: a near-identity start
        for lin in m.linear:
            if isinstance(lin, torch.nn.Linear):
                torch.nn.init.normal_(lin.weight, std=0.01)
                torch.nn.init.zeros_(lin.bias)
    hn = Hypernetwork(HYPERNETWORK_NAME, mods).to(DEVICE).requires_grad_(True)
    for m in unet.attention_modules():
        m.kv_hook = hn
    ctx_of = _context_fn(te, vocab)
    _fit_addon("hypernetwork", list(hn.parameters()), HN_LR, HN_STEPS, HN_BATCH, seed + 3, unet,
               mean, std, weight, lambda batch: ctx_of([caps[i] for i in batch]))
    file = {dim: [_cpu(m.state_dict()) for m in mods[dim]]}
    file.update({"name": HYPERNETWORK_NAME, "layer_structure": list(HN_LAYERS), "activation_func": "relu",
                 "is_layer_norm": False, "weight_initialization": "Normal", "use_dropout": False,
                 "activate_output": False, "last_layer_dropout": False, "step": HN_STEPS,
                 "sd_checkpoint": None, "sd_checkpoint_name": "shapes-model"})
    path = os.path.join(out, f"{HYPERNETWORK_NAME}.pt")
    torch.save(file, path)
    log(f"wrote {path}")


def empty_every(caps, every):
    """caps with every `every`-th one (1-based) made empty; 0 leaves them all."""
    return [c if not every or i % every != every - 1 else "" for i, c in enumerate(caps)]


def embedding_inputs(ids, word, vec, table):
    """The text encoder's input embeddings [B, 77, dim] for local ids [B, 77] in which the word
    stands len(vec) times in a row: its k-th copy gets vec[k], every other token its table row."""
    hit = ids == word
    k = (hit.cumsum(dim=1) - 1).clamp(min=0) % len(vec)  # which copy of the word
    return torch.where(hit[..., None], vec[k], table[ids])


def train_embedding(work, out, seed):
    vae, (te, unet), vocab = load_vae(work), load_unet_text(work, seed), Vocab()
    te.to(DEVICE)
    unet.to(DEVICE)
    mean, std, caps, weight = unet_data(vae, EMB_IMAGES, seed + 11, split="novel", style="filled",
                                        fg_weight=EMB_FG_WEIGHT)
    # The pipeline puts EMB_VECTORS vectors where the word stands; so does training, by writing
    # the word that many times and giving its k-th copy vector k.
    caps = [c.replace(EMBEDDING_WORD, " ".join([EMBEDDING_WORD] * EMB_VECTORS)) for c in caps]
    word = vocab.local[vocab.tok.encode(EMBEDDING_WORD)[0]]
    table = te.text_model.embeddings.token_embedding.weight[vocab.global_ids].clone()
    colours = [vocab.local[vocab.tok.encode(c)[0]] for c in D.BASE_COLOURS]
    vec = torch.nn.Parameter(table[colours].mean(0, keepdim=True).repeat(EMB_VECTORS, 1))  # [n, dim]

    def context(batch):
        return te(inputs_embeds=embedding_inputs(vocab.ids([caps[i] for i in batch]).to(DEVICE), word, vec, table))

    _fit_addon("embedding", [vec], EMB_LR, EMB_STEPS, EMB_BATCH, seed + 5, unet, mean, std, weight, context)
    path = os.path.join(out, f"{EMBEDDING_WORD}.safetensors")
    save_file({"emb_params": vec.detach().cpu().clone()}, path)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------- export


def export(work, out, seed):
    """The diffusers folder, fp16 safetensors."""
    vae, (te, unet) = load_vae(work), load_unet_text(work, seed)
    parts = {"vae": (vae, VAE_CONFIG, "diffusion_pytorch_model.safetensors"),
             "unet": (unet, UNET_CONFIG, "diffusion_pytorch_model.safetensors"),
             "text_encoder": (te, TEXT_CONFIG, "model.safetensors")}
    for name, (module, cfg, fname) in parts.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        save_file(sd, os.path.join(d, fname), metadata={"format": "pt"})
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"]}, f, indent=2)
    log(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.normpath(DEFAULT_OUT), help="model folder to write")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shapes-train"),
                   help="where stages keep their checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                   help=f"which steps, sizes and weightings (default {DEFAULT_RECIPE}; "
                   "examples/shapes/README.md has each one's time and scores)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default cpu; e.g. cuda)")
    p.add_argument("--stages", default="vae,unet,hypernetwork,embedding",
                   help="comma-separated subset of vae,unet,hypernetwork,embedding; the folder is "
                   "written after unet (or alone with 'export')")
    p.add_argument("--vae-phase", type=int, default=0,
                   help="resume the vae stage at this phase (its vae_raw.pt has the earlier ones)")
    p.add_argument("--unet-phase", type=int, default=0,
                   help="resume the unet stage at this phase (from the unet_text.pt the earlier ones saved)")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="score the EMA UNet on 100 held-out prompts every STEPS UNet steps (a multiple "
                   "of 500) and at the end of each phase")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on a few pictures per stage: checks the script runs, trains nothing")
    a = p.parse_args(argv)
    g = globals()
    g.update(RECIPES[a.recipe])
    log(f"recipe {a.recipe}")
    if a.quick:
        for k in ("VAE", "UNET", "HN", "EMB"):
            g[f"{k}_BATCH"], g[f"{k}_IMAGES"] = 4, 64
        g["HN_STEPS"] = g["EMB_STEPS"] = 2
        g["VAE_PHASES"] = ((2, 1e-3), (2, 5e-4))  # two phases each, so resuming is exercised too
        g["UNET_PHASES"] = ((2, 1e-3, 2, 0.0), (2, 5e-4, 2, 0.1))
        g["VAE_EXTRA"] = (2, 5e-4)  # with VAE_TARGET set, an untrained VAE takes both extras
    global DEVICE
    DEVICE = torch.device(a.device)
    stages = a.stages.split(",")
    unknown = set(stages) - {"vae", "unet", "hypernetwork", "embedding", "export"}
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}")
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if "vae" in stages:
        train_vae(a.work, a.seed, a.vae_phase)
    if "unet" in stages:
        train_unet(a.work, a.seed, a.eval_every, a.unet_phase)
    if "unet" in stages or "export" in stages:
        export(a.work, a.out, a.seed)
    if "hypernetwork" in stages:
        train_hypernetwork(a.work, a.out, a.seed)
    if "embedding" in stages:
        train_embedding(a.work, a.out, a.seed)
    log(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
