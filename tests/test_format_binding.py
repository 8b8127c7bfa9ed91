"""Issue 13 item 1: a shard file's data is bound to its manifest record. A shard copied over another of
the same geometry (another parameter, another state, another shard of the same array, an older version
of the same checkpoint) is caught by ``verify`` and by every read path; format_version 1 manifests, which
could not tell, are read with a warning."""
import shutil

import pytest
import torch

from ucp.errors import CorruptChunkError
from ucp.format import FORMAT_VERSION, create_checkpoint, open_checkpoint, verify

from _manifest_edit import rewrite_manifest

SH = dict(shards=(32, 64), chunks=(8, 16))  # every (64, 64) array: 2 shards of 16 inner chunks each


def write(path, base=1.0, overwrite=False):
    with create_checkpoint(path, durable=False, overwrite=overwrite) as w:
        for i in range(2):
            t = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) + 10000 * (base + i)
            w.write_tensor(f"layers.{i}.w", "param", t, **SH)
            w.write_tensor(f"layers.{i}.w", "exp_avg", t * 10, **SH)
            w.write_tensor(f"layers.{i}.w", "exp_avg_sq", t * 100, **SH)
        # the case with the default layout: 512 x 512 fp32 (1 MiB) is sharded by default
        w.write_tensor("big.0", "param", torch.full((512, 512), 1.0))
        w.write_tensor("big.1", "param", torch.full((512, 512), 2.0))
    return path


def shard(root, name, state="param", key="c/0/0"):
    return root / name / state / key


def assert_caught(root, name, state, rows=slice(0, 1)):
    problems = verify(root)
    assert any(f"{name}/{state}" in p and "content crc32c" in p for p in problems), problems
    with pytest.raises(CorruptChunkError, match="content crc32c"):
        open_checkpoint(root).read(name, state)  # whole-shard read path
    with pytest.raises(CorruptChunkError, match="content crc32c"):
        open_checkpoint(root).read(name, state, index=(rows, slice(0, 4)))  # ranged (partial) read path


@pytest.fixture
def ck(tmp_path):
    root = write(tmp_path / "ck")
    assert verify(root) == []
    return root


@pytest.mark.parametrize("src,dst", [
    (("layers.1.w", "param", "c/0/0"), ("layers.0.w", "param", "c/0/0")),  # another parameter
    (("layers.0.w", "exp_avg_sq", "c/0/0"), ("layers.0.w", "exp_avg", "c/0/0")),  # another state
    (("layers.0.w", "param", "c/1/0"), ("layers.0.w", "param", "c/0/0")),  # another shard of the array
    (("big.1", "param", "c/0/0"), ("big.0", "param", "c/0/0")),  # the reproduction
], ids=["cross-param", "cross-state", "same-array", "default-layout"])
def test_swapped_shard_of_same_geometry_is_caught(ck, src, dst):
    a, b = shard(ck, *src), shard(ck, *dst)
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    shutil.copyfile(a, b)
    assert_caught(ck, dst[0], dst[1])


def test_shard_from_an_older_version_of_the_same_checkpoint_is_caught(tmp_path):
    root = write(tmp_path / "ck", base=1.0)
    old = shard(root, "layers.0.w").read_bytes()
    write(root, base=5.0, overwrite=True)
    shard(root, "layers.0.w").write_bytes(old)
    assert_caught(root, "layers.0.w", "param")


def test_inner_chunks_reordered_inside_a_shard_are_caught(ck):
    f = shard(ck, "layers.0.w")
    data = bytearray(f.read_bytes())
    n = 8 * 16 * 4 + 4  # one inner chunk and its crc32c word
    data[:n], data[n:2 * n] = data[n:2 * n], data[:n]
    f.write_bytes(bytes(data))  # each inner chunk still matches its own crc32c, the index is unchanged
    assert_caught(ck, "layers.0.w", "param")


def test_format_version_1_is_read_with_a_warning(ck):
    def as_version_1(doc):
        doc["format_version"] = 1
        for p in doc["params"]:
            for rec in p["states"].values():
                if "inner_chunks" in rec:
                    rec["chunk_table"] = {k: v[:2] for k, v in rec["chunk_table"].items()}

    rewrite_manifest(ck, as_version_1)
    assert FORMAT_VERSION == 2
    with pytest.warns(UserWarning, match="format_version 1 does not bind shard contents"):
        got = open_checkpoint(ck).read("layers.1.w", "exp_avg")
    assert torch.equal(got, (torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) + 20000) * 10)
