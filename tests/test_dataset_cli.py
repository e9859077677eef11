"""`fastdiff dataset`: --help says what the command does, the options reach build() (the CLI's
shards equal the API's byte for byte), each caption format reads the same captions, and bad
input is one line with exit 2."""
import csv
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastdiff
from fastdiff import cli, dataset
from fastdiff.dataset import read_captions

ROWS = ["a red circle, top left", "", "a blue square on a \"yellow\" background", "a red circle, top left",
        "  a green\tdiamond  "]
WANT_TEXTS = ["a red circle, top left", 'a blue square on a "yellow" background', "a red circle, top left",
              "a green\tdiamond"]


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("captions")
    (d / "c.txt").write_text("\r\n".join(ROWS) + "\r\n", encoding="utf-8")
    with open(d / "c.jsonl", "w", encoding="utf-8") as f:
        for k, r in enumerate(ROWS):
            f.write("\n" if not r else json.dumps({"id": k, "caption" if k % 2 else "text": r}) + "\n")
    for name, delim in (("c.csv", ","), ("c.tsv", "\t")):
        with open(d / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["url", "caption"])
            for k, r in enumerate(ROWS):
                w.writerow([f"http://x/{k}.jpg", r])
    pq.write_table(pa.table({"TEXT": ROWS[:1] + [None] + ROWS[2:], "n": list(range(5))}), d / "c.parquet")
    return d


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl", "c.csv", "c.tsv", "c.parquet"])
def test_each_caption_format(caption_files, name):
    caps = read_captions(caption_files / name)
    assert caps.format == name.split(".")[1] and caps.rows == 5
    assert caps.indices == [0, 2, 3, 4] and caps.texts == WANT_TEXTS
    assert caps.empty == [1] and caps.duplicates == [(3, 0)]
    report = "\n".join(caps.report())
    assert "5 rows, 4 captions" in report and "1 empty rows" in report and "(rows 1)" in report
    assert "1 rows repeat an earlier caption" in report and "3 = 0" in report
    assert caps.sha256() == read_captions(caption_files / "c.txt").sha256()


def test_caption_file_errors(tmp_path):
    (tmp_path / "a.csv").write_text("url,alt\nx,y\n")
    with pytest.raises(ValueError, match="no 'caption' or 'text' column.*url, alt"):
        read_captions(tmp_path / "a.csv")
    assert read_captions(tmp_path / "a.csv", column="alt").texts == ["y"]
    (tmp_path / "b.jsonl").write_text('{"caption": "ok"}\n{"caption": \n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_captions(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"caption": 3}\n')
    with pytest.raises(ValueError, match="line 1: 'caption' is not a string"):
        read_captions(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_captions(tmp_path / "none.txt")


def test_help_tells_the_truth():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "dataset", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for phrase in ["BASE + i * IMAGES_PER_CAPTION + j", "KEY.png|jpg|webp", "index.parquet", "stats.json",
                   "skips the finished shards", "naming what differs", "--ray [ADDRESS]", "--workers N",
                   "--shard-size IMAGES", "rounded down to whole captions", "(default 10)", "(default 2,",
                   "--caption-column NAME", "exit status"]:
        assert phrase in text, phrase
    assert "dataset" in subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True,
                                       text=True, timeout=60).stdout


def test_cli_equals_api(caption_files, tmp_path):
    args = ["--images-per-caption", "2", "--cfg", "3", "--steps", "2", "--sampler", "euler", "--schedule", "karras",
            "--size", "48x32", "--seed", "77", "--negative", "blurry", "--format", "webp", "--shard-size", "3",
            "--caption-column", "caption", "--quiet"]
    assert cli.main(["dataset", str(caption_files / "c.csv"), "--out", str(tmp_path / "cli"), *args]) == 0
    pipe = fastdiff.load(device="cpu", dtype="float32")
    stats = dataset.build(caption_files / "c.csv", tmp_path / "api", pipe=pipe, images_per_caption=2,
                          guidance_scale=3.0, steps=2, sampler="euler", schedule="karras", width=48, height=32,
                          seed=77, negative_prompt="blurry", format="webp", shard_size=3, caption_column="caption",
                          progress=False)
    assert stats["shards"] == 4 and stats["complete"]  # 3 images a shard: one caption of 2 images each
    names = sorted(os.listdir(tmp_path / "api"))
    assert names == sorted(os.listdir(tmp_path / "cli"))
    for name in names:
        if name != "stats.json":
            assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes(), name


def test_cli_errors_are_one_line(caption_files, tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["dataset", str(caption_files / "c.txt"), "--out", str(out), "--images-per-caption", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fastdiff dataset: error: images_per_caption must be an integer >= 1, got 0"
    assert cli.main(["dataset", str(caption_files / "c.txt"), "--out", str(out), "--workers", "2"]) == 2
    assert "needs ray (--ray)" in capsys.readouterr().err
    assert cli.main(["dataset", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not out.exists()
