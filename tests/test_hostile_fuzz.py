"""Fuzzing the readers of untrusted input: the safetensors and pickle readers, the add-on
readers built on them, and check_request. Each must answer only with its documented errors
(FormatError from the readers, ValueError / FileNotFoundError from check_request), never with
anything else. Bounded (hypothesis max_examples, no deadline) to about a minute in all."""
import io
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes

from fastdiff.formats import FormatError, load_embedding, load_pickle, read_hypernetwork
from fastdiff.formats.files import TensorFile
from fastdiff.loader import DEFAULT_MODEL
from fastdiff.request import check_request

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _seeds():
    """Valid files to mutate: a safetensors embedding, a zip pickle and a legacy pickle."""
    st_bytes = save_bytes({"emb_params": torch.randn(2, 64)})
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "x"}, buf)
    zip_bytes = buf.getvalue()
    buf = io.BytesIO()
    torch.save({64: [{"linear1.weight": torch.randn(128, 64)}, {}]}, buf, _use_new_zipfile_serialization=False)
    legacy = buf.getvalue()
    return [st_bytes, zip_bytes, legacy, (DEFAULT_MODEL / "shapes-outlined.pt").read_bytes()[:4096]]


SEEDS = _seeds()
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
READERS = [TensorFile, lambda p: load_pickle(p), load_embedding, read_hypernetwork]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "u64"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:pos]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "u64" and len(data) >= pos + 8:
            data[pos:pos + 8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2 ** 31, 2 ** 63, 2 ** 64 - 1])))
    return bytes(data)


def _read_all(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.bin")
        with open(path, "wb") as f:
            f.write(data)
        for read in READERS:
            try:
                read(path)
            except FormatError:
                pass


@FUZZ
@given(mutated())
def test_mutated_weight_files_raise_only_format_errors(data):
    _read_all(data)


@FUZZ
@given(st.binary(max_size=512).map(lambda b: b"\x80" + b) | st.binary(max_size=512))
def test_random_bytes_raise_only_format_errors(data):
    _read_all(data)


@FUZZ
@given(st.binary(max_size=300).map(lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 64)
       | st.dictionaries(st.text(max_size=8), st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                                                              st.one_of(st.integers(-2, 2 ** 40), st.text(max_size=4),
                                                                        st.lists(st.integers(-2, 2 ** 33), max_size=3))),
                         max_size=3).map(lambda d: (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 64)(
                             repr(d).replace("'", '"').encode())))
def test_safetensors_headers_raise_only_format_errors(data):
    _read_all(data)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(allow_nan=True),
                    st.text(max_size=30), st.just(np.int64(3)), st.just(np.float32(2.5)), st.just(np.bool_(True)),
                    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                    st.tuples(st.text(max_size=5), st.floats()))
ARGS = ["negative_prompt", "steps", "guidance_scale", "sampler", "schedule", "seed", "width", "height", "num_images",
        "batch_size", "hypernetworks", "clip_skip", "strength", "output_type", "embeddings"]


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(SCALARS, st.lists(st.text(max_size=40), max_size=4), st.text(alphabet="()[]:.\\0123456789e+- aBREAK",
                                                                                 max_size=60)),
       st.dictionaries(st.sampled_from(ARGS), SCALARS, max_size=5))
def test_check_request_raises_only_documented_errors(prompt, kwargs):
    try:
        req = check_request(prompt, **kwargs)
    except (ValueError, FileNotFoundError):
        return
    assert req.steps >= 1 and req.num_images >= 1 and isinstance(req.seed, int)
    assert all(isinstance(p, str) for p in req.prompts + req.negs)


def test_the_fuzz_seeds_are_readable():
    """The mutations start from files the readers accept (so the fuzz reaches past the sniffing)."""
    with tempfile.TemporaryDirectory() as d:
        for i, data in enumerate(SEEDS[:2]):
            path = os.path.join(d, f"s{i}")
            with open(path, "wb") as f:
                f.write(data)
            assert load_embedding(path).vectors.shape == (2, 64)

