"""Sharded streaming writer and atomic output directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nvfp4_dist.errors import ExportError
from nvfp4_dist.export.outdir import MARKER_NAME
from nvfp4_dist.export.writer import (INDEX_NAME, ShardWriter, atomic_output_dir, finalize_shards,
                                      parse_size, prepare_staging, shard_file_name)

META = {"format": "pt", "nvfp4_dist_format": "modelopt", "format_version": "1"}


def _f32(n: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32)  # 4n bytes


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_shard_file_name_is_hf_naming():
    assert shard_file_name(2, 13) == "model-00002-of-00013.safetensors"


def test_shards_respect_the_size_bound_and_index_maps_every_tensor(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=100, metadata=META)
    sizes = {"a": 10, "b": 10, "c": 5, "big": 40, "d": 1}  # floats: 40, 40, 20, 160, 4 bytes
    for name, n in sizes.items():
        writer.add(name, _f32(n, value=n))
    index = finalize_shards(tmp_path, writer.close())
    # a+b+c = 100 bytes fill the first file; big (160 > bound) gets its own; d starts a third.
    expected = {"a": 1, "b": 1, "c": 1, "big": 2, "d": 3}
    assert index["weight_map"] == {k: shard_file_name(v, 3) for k, v in expected.items()}
    assert index["metadata"]["total_size"] == 4 * sum(sizes.values())
    assert json.loads((tmp_path / INDEX_NAME).read_text()) == index
    assert _files(tmp_path) == sorted([INDEX_NAME] + [shard_file_name(k, 3) for k in (1, 2, 3)])
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, framework="pt") as f:
            assert f.metadata() == META
            assert torch.equal(f.get_tensor(name), _f32(sizes[name], value=sizes[name]))


def test_writer_copies_tensors_and_keeps_dtypes(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size="1MB", metadata=META)
    base = torch.arange(8, dtype=torch.float32)
    scales = torch.tensor([0.5, 448.0]).to(torch.float8_e4m3fn)
    writer.add("view", base[::2])  # non-contiguous view
    writer.add("alias", base)  # shares storage with "view"
    writer.add("fp8", scales)
    writer.add("zero_d", torch.tensor(3.0))
    base.zero_()  # the writer holds its own copies
    index = finalize_shards(tmp_path, writer.close())
    with safe_open(tmp_path / index["weight_map"]["view"], framework="pt") as f:
        assert torch.equal(f.get_tensor("view"), torch.tensor([0.0, 2.0, 4.0, 6.0]))
        assert torch.equal(f.get_tensor("alias"), torch.arange(8, dtype=torch.float32))
        fp8 = f.get_tensor("fp8")
        assert fp8.dtype == torch.float8_e4m3fn and torch.equal(fp8.view(torch.uint8), scales.view(torch.uint8))
        assert f.get_tensor("zero_d").shape == ()


def test_duplicate_names_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, metadata=META)
    writer.add("x", _f32(2))
    with pytest.raises(ExportError, match="'x' was written twice"):
        writer.add("x", _f32(2))


def test_several_writers_merge_into_one_numbering_and_index(tmp_path):
    """The multi-rank shape: each 'rank' writes its own files, one finalize numbers them all."""
    records = []
    for rank, names in enumerate((["r0a", "r0b"], ["r1a"])):
        writer = ShardWriter(tmp_path, max_shard_size=8, metadata=META, prefix=f"rank{rank:05d}")
        for name in names:
            writer.add(name, _f32(2))
        records += writer.close()
    index = finalize_shards(tmp_path, records)
    assert index["weight_map"] == {"r0a": shard_file_name(1, 3), "r0b": shard_file_name(2, 3),
                                   "r1a": shard_file_name(3, 3)}
    assert not list(tmp_path.glob("*.partial"))


def test_a_tensor_written_by_two_writers_is_refused(tmp_path):
    records = []
    for rank in range(2):
        writer = ShardWriter(tmp_path, metadata=META, prefix=f"rank{rank}")
        writer.add("same", _f32(1))
        records += writer.close()
    with pytest.raises(ExportError, match="'same' was written by two writers"):
        finalize_shards(tmp_path, records)


@pytest.mark.parametrize("bad", ["lots", 0, -5])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ExportError, match="max_shard_size"):
        parse_size(bad)


def test_existing_target_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        prepare_staging(target)
    assert _files(tmp_path) == ["out"] and (target / "keep").read_text() == "old"


def test_failure_leaves_no_target_and_no_staging(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target) as staging:
            (staging / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_overwrite_replaces_the_old_dir_only_at_the_end(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as staging:  # an earlier export: it carries the marker
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("fail before publishing")
    assert _files(tmp_path) == ["out"] and _files(target) == [MARKER_NAME, "old.txt"]

    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # untouched while the new one is written
    assert _files(tmp_path) == ["out"] and _files(target) == ["new.txt", MARKER_NAME]
