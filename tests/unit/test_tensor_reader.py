"""glm_core.tensor_reader: tensors read by byte range equal what safetensors itself reads, in order, with errors
that say which tensor failed."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm_core.tensor_reader import TensorReader, read_in_order


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_every_tensor_of_the_tiny_checkpoint_reads_as_safetensors_reads_it(tiny_checkpoint):
    reader = TensorReader(torch.device("cpu"))
    files = _safetensors_files(tiny_checkpoint)
    assert files
    checked = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                expected = handle.get_tensor(key)
                dtype_name = str(handle.get_slice(key).get_dtype())
                got = reader.read(path, key, dtype_name, tuple(expected.shape))
                assert got.dtype == expected.dtype and got.shape == expected.shape, key
                assert torch.equal(got.view(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key
                checked += 1
    assert checked > 50


def test_dtypes_and_empty_and_scalar_tensors(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "i64": torch.arange(4),
        "bool": torch.tensor([True, False, True]), "fp8": torch.randn(2, 16).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = TensorReader(torch.device("cpu"))
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3"}
    for key, expected in tensors.items():
        got = reader.read(path, key, names[expected.dtype], tuple(expected.shape))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key


def test_a_truncated_file_raises_eof_naming_the_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64), "b": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the last tensor loses its tail
    reader = TensorReader(torch.device("cpu"))
    with pytest.raises(EOFError, match="'b'"):
        reader.read(path, "b", "F32", (64,))


def test_a_byte_range_that_disagrees_with_the_shape_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64)}, str(path))
    with pytest.raises(EOFError, match="holds 256 bytes in the file, expected 512"):
        TensorReader(torch.device("cpu")).read(path, "a", "F32", (128,))


def test_read_in_order_keeps_the_order_and_bounds_what_is_in_flight():
    in_flight, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()

    def read(item: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        release.wait(0.01)
        with lock:
            in_flight[0] -= 1
        return item * item

    results = list(read_in_order(range(50), read, threads=3))
    assert results == [(i, i * i) for i in range(50)]
    assert 1 <= most[0] <= 3


def test_read_in_order_raises_the_first_failure_with_its_item():
    def read(item: int) -> int:
        if item == 7:
            raise OSError("disk gone")
        return item

    seen = []
    with pytest.raises(OSError, match="disk gone") as info:
        for item, value in read_in_order(range(20), read, threads=4):
            seen.append(value)
    assert info.value.item == 7
    assert seen == list(range(7))
