"""`fastdiff ...` commands. Heavy imports happen inside the commands so `--help` is instant."""
from __future__ import annotations

import argparse
import sys

from fastdiff.argtypes import hypernetwork as _hypernetwork
from fastdiff.argtypes import size as _size


def build_parser() -> argparse.ArgumentParser:
    from fastdiff import __version__

    p = argparse.ArgumentParser(
        prog="fastdiff",
        description="Fast Stable Diffusion-family inference: fused Triton kernels and a C++ "
        "sampling loop.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt and write PNG files")
    g.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    g.add_argument("--model", default=None,
                   help="a diffusers folder or a single .safetensors/.ckpt file "
                   "(default: the small model that ships with fastdiff)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    g.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    g.add_argument("--sampler", default="euler_ancestral", help="sampler name (default euler_ancestral)")
    g.add_argument("--schedule", default="normal", help="noise schedule (default normal)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    g.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    g.add_argument("--num", type=int, default=1, help="number of images (seeds seed, seed+1, ...)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images decoded together on CUDA (default: max_batch, 8); the engine "
                   "batches the UNet calls of all images itself, up to max_batch")
    g.add_argument("--hypernetwork", type=_hypernetwork, action="append", default=[],
                   metavar="PATH[:STRENGTH]", help="an A1111 hypernetwork; repeat to stack")
    g.add_argument("--hypernetwork-dir", default=None, metavar="DIR",
                   help="folder for <hypernet:NAME:MULTIPLIER> tags in the prompt (A1111's syntax)")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding, used by writing its name in the prompt")
    g.add_argument("--clip-skip", type=int, default=1, help="A1111 clip skip (default 1)")
    g.add_argument("--init-image", default=None, help="img2img: start from this image")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength in (0, 1]")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    g.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("info", help="print what fastdiff detects in a checkpoint")
    i.add_argument("path", help="a diffusers folder, single-file checkpoint, VAE, hypernetwork or embedding")
    i.set_defaults(func=_cmd_info)

    b = sub.add_parser("bench", help="time fastdiff against diffusers on identical random weights")
    b.add_argument("--out", default=None, help="write the results JSON here")
    b.add_argument("--quick", action="store_true", help="reduced configuration (CPU smoke run)")
    b.add_argument("--compile", action="store_true", help="add torch.compile(diffusers UNet) as a second baseline")
    b.set_defaults(func=_cmd_bench)
    from fastdiff.serve.cli import add_parser as add_serve_parser  # sets func: fastdiff.serve.cli.main
    add_serve_parser(sub)

    from fastdiff.dataset.cli import add_parser as add_dataset_parser

    add_dataset_parser(sub)  # `fastdiff dataset`: its parser sets func=fastdiff.dataset.cli.main
    p.epilog = f"fastdiff {__version__}. `fastdiff COMMAND --help` describes each command."
    return p


def _cmd_generate(args) -> int:
    import os

    from fastdiff.loader import generate

    _check_out(args.out)  # before any work: a bad --out must not cost a whole run
    width, height = args.size if args.size else (None, None)
    result = generate(
        args.prompt,
        model=args.model,
        negative_prompt=args.negative,
        steps=args.steps,
        guidance_scale=args.cfg,
        sampler=args.sampler,
        schedule=args.schedule,
        seed=args.seed,
        width=width,
        height=height,
        num_images=args.num,
        batch_size=args.batch_size,
        hypernetworks=tuple(args.hypernetwork),
        hypernetwork_dir=args.hypernetwork_dir,
        embeddings=tuple(args.embedding),
        clip_skip=args.clip_skip,
        init_image=args.init_image,
        strength=args.strength,
        device=args.device,
        dtype=args.dtype,
        progress=True,
    )
    os.makedirs(args.out, exist_ok=True)
    for path in result.save(args.out):
        print(path)
    return 0


def _check_out(out: str) -> None:
    """--out is a writable folder, or can be made one (made only once there are images)."""
    import os

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: cannot create the folder, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def _cmd_info(args) -> int:
    from fastdiff import formats as F

    try:
        print(F.describe(args.path))
        return 0
    except F.FormatError as e:
        model_error = e
    # Not a whole model: one of the add-ons `generate` takes, or a standalone VAE.
    for read, show in ((F.read_hypernetwork, _hypernetwork_lines), (F.load_embedding, _embedding_lines),
                       (F.open_vae, _vae_lines)):
        try:
            found = read(args.path)
        except F.FormatError:
            continue
        print("\n".join([f"path:        {args.path}", *show(found)]))
        return 0
    raise model_error


def _hypernetwork_lines(hf):
    return [f"kind:        hypernetwork ({hf.config['format']})", f"name:        {hf.name}",
            f"widths:      {hf.dims}", f"params:      {hf.num_params():,}"]


def _embedding_lines(emb):
    return ["kind:        textual-inversion embedding",
            f"name:        {emb.name} (write it in a prompt)",
            f"vectors:     {emb.num_vectors} x {emb.width}"]


def _vae_lines(vae):
    c = vae.config
    return ["kind:        VAE (KL)", f"widths:      {c.get('block_out_channels')}",
            f"latents:     {c.get('latent_channels')} channels, scaling factor {c.get('scaling_factor')}",
            f"tensors:     {len(vae)}"]


def _cmd_bench(args) -> int:
    from fastdiff.bench import main as bench_main

    return bench_main(out=args.out, quick=args.quick, compile_baseline=args.compile)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from fastdiff import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, FloatingPointError) as e:
        # Bad input (arguments, files, a model that gives NaN) gets one clear line, not a traceback.
        msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"fastdiff {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
