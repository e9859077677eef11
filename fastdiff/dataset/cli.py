"""`fastdiff dataset CAPTIONS --out DIR ...`: the command face of `fastdiff.dataset.build`."""
from __future__ import annotations

import argparse

from fastdiff.argtypes import hypernetwork as _hypernetwork
from fastdiff.argtypes import size as _size

DESCRIPTION = """\
Generate a synthetic image dataset: IMAGES_PER_CAPTION images for every caption, written as
webdataset tar shards (00000.tar, ...). Each sample is KEY.png|jpg|webp, KEY.txt (the caption)
and KEY.json (caption index, image index, seed, generation parameters, model hash); all images
of a caption are adjacent in one shard. DIR also gets index.parquet (every sample; index.jsonl
without pyarrow), stats.json (counts, images/s, failures) and dataset.json (the arguments).

Image j of caption i (its row in CAPTIONS, from 0) uses seed BASE + i * IMAGES_PER_CAPTION + j,
so `fastdiff generate CAPTION --seed SEED` with the same options gives the same image.
Empty rows get no images; they and repeated captions are reported.

Resuming: shards appear only when finished. Rerun the same command after a crash or kill and
it skips the finished shards and redoes the rest; a rerun with different arguments against an
existing DIR is refused with a message naming what differs."""

EPILOG = """\
example:
  fastdiff dataset captions.txt --out shards/ --images-per-caption 10 --cfg 2
  fastdiff dataset cc3m.parquet --out /mnt/nfs/cc3m-sd --ray --workers 8

exit status: 0 when every shard is written, 1 when some failed (rerun to retry them),
2 on bad arguments."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
        "dataset", help="generate many images per caption into resumable webdataset shards",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("captions", metavar="CAPTIONS",
                   help="caption file: .txt (one per line), .jsonl (a 'caption' or 'text' field), "
                   ".csv/.tsv (a 'caption' or 'text' column) or .parquet")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    d.add_argument("--caption-column", default=None, metavar="NAME",
                   help="the caption field/column of a JSONL, CSV/TSV or parquet file (default: caption, "
                   "else text)")
    d.add_argument("--model", default=None, metavar="PATH",
                   help="a diffusers folder or a single .safetensors/.ckpt file "
                   "(default: the small model that ships with fastdiff)")
    d.add_argument("--images-per-caption", type=int, default=10, metavar="N", help="images per caption (default 10)")
    d.add_argument("--cfg", type=float, default=2.0,
                   help="classifier-free guidance scale (default 2, StableRep's choice: more guidance, "
                   "less diversity)")
    d.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    d.add_argument("--sampler", default="euler_ancestral", help="sampler name (default euler_ancestral)")
    d.add_argument("--schedule", default="normal", help="noise schedule (default normal)")
    d.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    d.add_argument("--seed", type=int, default=0, metavar="BASE", help="seed base (default 0)")
    d.add_argument("--negative", default="", metavar="TEXT", help="negative prompt for every caption")
    d.add_argument("--hypernetwork", type=_hypernetwork, action="append", default=[],
                   metavar="PATH[:STRENGTH]", help="an A1111 hypernetwork; repeat to stack")
    d.add_argument("--clip-skip", type=int, default=1, help="A1111 clip skip (default 1)")
    d.add_argument("--format", default="png", choices=["png", "jpg", "webp"],
                   help="image format in the shards (default png, lossless; jpg and webp at quality 95)")
    d.add_argument("--shard-size", type=int, default=1000, metavar="IMAGES",
                   help="images per shard, rounded down to whole captions (default 1000)")
    d.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    d.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    d.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on a Ray cluster with Ray Data: at ADDRESS, or (no ADDRESS) RAY_ADDRESS or a new "
                   "local one. DIR must be a path every node sees. Needs fastdiff[ray]")
    d.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: actors, each holding a loaded model (default: one per GPU of the "
                   "cluster; on CPU, 1)")
    d.add_argument("--quiet", action="store_true", help="no progress bar or report")
    d.set_defaults(func=main)
    return d


def main(args) -> int:
    from fastdiff.dataset import build

    width, height = args.size if args.size else (None, None)
    stats = build(
        args.captions, args.out, model=args.model, images_per_caption=args.images_per_caption,
        guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
        width=width, height=height, seed=args.seed, negative_prompt=args.negative,
        hypernetworks=tuple(args.hypernetwork), clip_skip=args.clip_skip, format=args.format,
        shard_size=args.shard_size, caption_column=args.caption_column, device=args.device, dtype=args.dtype,
        ray=args.ray, workers=args.workers, progress=not args.quiet)
    return 0 if stats["complete"] else 1
