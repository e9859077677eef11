"""python -m examples.shapes --out sheet.png: draw a contact sheet of samples and print captions."""

import argparse

from PIL import Image

from .checker import check
from .data import contact_sheet, sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="shapes_sheet.png")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout", "novel"])
    p.add_argument("--style", default="filled", choices=["filled", "outlined", "mixed"])
    p.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the sheet")
    args = p.parse_args(argv)
    images = []
    for i in range(args.n):
        image, text, attrs = sample(i, args.seed, args.split, args.style)
        images.append(image)
        print(f"{i:4d}  {'ok ' if check(image, attrs)['all'] else 'BAD'}  {text}")
    sheet = Image.fromarray(contact_sheet(images))
    sheet = sheet.resize((sheet.width * args.scale, sheet.height * args.scale), Image.NEAREST)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
