"""gptdist's safetensors reader and writer: the same tensors as the library's, any range of any dimension, one pass
that writes and hashes, and a header checked against the file before anything is allocated."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptdist.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from gptdist.errors import UserError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(6, 10, generator=g), "b": torch.randn(4, 3, 5, generator=g).to(torch.bfloat16),
            "c": torch.arange(7, dtype=torch.int64), "s": torch.tensor(2.5), "u": torch.arange(5, dtype=torch.uint8)}


def test_reads_equal_the_library_reader(tmp_path):
    save_file(_tensors(), str(tmp_path / "t.safetensors"))
    ref = load_file(str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(ref)
    for name, value in ref.items():
        torch.testing.assert_close(f.read(name), value, rtol=0, atol=0)
    torch.testing.assert_close(f.read("a", 0, 2, 5), ref["a"][2:5], rtol=0, atol=0)
    torch.testing.assert_close(f.read("a", 1, 3, 9), ref["a"][:, 3:9], rtol=0, atol=0)
    torch.testing.assert_close(f.read("b", 1, 1, 3), ref["b"][:, 1:3], rtol=0, atol=0)
    torch.testing.assert_close(f.read("b", 2, 0, 2), ref["b"][:, :, 0:2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):
        f.read("a", 0, 4, 9)


def test_writer_output_is_read_by_the_library_and_its_hash_is_the_file_s(tmp_path):
    tensors = _tensors()
    size, digest = write_safetensors(tmp_path / "w.safetensors", tensors, {"note": "x"})
    data = (tmp_path / "w.safetensors").read_bytes()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    back = load_file(str(tmp_path / "w.safetensors"))
    for name, value in tensors.items():
        torch.testing.assert_close(back[name], value, rtol=0, atol=0)
    assert SafetensorsFile(tmp_path / "w.safetensors").metadata == {"note": "x"}


def _crafted(path, header: dict, data: bytes = b"\0" * 16) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header,why", [
    ({"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, "lies outside the file"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "offsets do not match its shape"),
    ({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, "no known dtype"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
    ({"__metadata__": {"format": ["pt"]}}, "__metadata__ is not a mapping of strings"),
])
def test_a_crafted_header_is_refused_before_any_allocation(tmp_path, header, why):
    _crafted(tmp_path / "bad.safetensors", header)
    with pytest.raises(UserError, match=why):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_a_header_longer_than_the_file_and_a_pickle_are_refused(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(UserError, match="claims"):
        SafetensorsFile(path)
    import pickle

    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        SafetensorsFile(path)
    truncated = tmp_path / "cut.safetensors"
    save_file(_tensors(), str(tmp_path / "t.safetensors"))
    truncated.write_bytes((tmp_path / "t.safetensors").read_bytes()[:-40])
    with pytest.raises(UserError, match="lies outside the file"):
        SafetensorsFile(truncated)


def test_an_hf_model_with_a_crafted_header_is_refused_by_import(tmp_path):
    """`gptdist import-hf` reads model.safetensors with the same checked reader: a header asking for terabytes is
    one line, not an allocation."""
    from gptdist.tools.import_hf import read_hf_weights

    _crafted(tmp_path / "model.safetensors",
             {"wte.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    with pytest.raises(UserError, match="lies outside the file"):
        read_hf_weights(tmp_path)
