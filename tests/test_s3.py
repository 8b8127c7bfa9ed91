"""A checkpoint written to and read from a real S3 API (moto server on loopback) through fsspec."""
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ucp.errors import CorruptChunkError, NotCommittedError  # noqa: E402
from ucp.format import create_checkpoint, open_checkpoint, verify  # noqa: E402

from _ports import free_port  # noqa: E402


READY_ATTEMPTS = 1200  # connection attempts, one per 0.1 s at most: two minutes on a loaded machine


def _wait_for_port(proc, port, log):
    """Readiness is the event "the server accepts a connection"; the loop only bounds the wait.
    A server that never answers fails the tests (it does not skip them)."""
    for _ in range(READY_ATTEMPTS):
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with code {proc.returncode} before accepting connections; "
                        f"its output:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)  # pause between attempts, not a synchronisation
    pytest.fail(f"moto_server did not accept connections on port {port} after {READY_ATTEMPTS} attempts; "
                f"its output:\n{log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=logf, stderr=logf)
    try:
        _wait_for_port(proc, port, log)
        endpoint = f"http://127.0.0.1:{port}"
        import botocore.session

        opts = {"endpoint_url": endpoint, "key": "x", "secret": "x"}
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        client.create_bucket(Bucket="ucp-test")
        yield opts
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_s3_roundtrip_verify_and_zarr(s3):
    import zarr

    url = "s3://ucp-test/ck"
    w0 = torch.randn(300, 17)
    b = torch.randn(50).bfloat16()
    with create_checkpoint(url, storage_options=s3, chunk_bytes=4096) as w:
        a = w.add_array("layers.0.w", "param", w0.shape, w0.dtype)
        a.write((100, 0), w0[100:])       # out of order, partial chunks
        a.write((0, 0), w0[:100])
        w.write_tensor("layers.0.w", "exp_avg", w0 * 2)
        w.write_tensor("b/x", "param", b)
        w.set_metadata({"iteration": 3, "rng": torch.get_rng_state(), "lr": float("nan")})
    ck = open_checkpoint(url, storage_options=s3)
    assert ck.params == ["layers.0.w", "b/x"]
    assert torch.equal(ck.read("layers.0.w"), w0)
    assert torch.equal(ck.read("layers.0.w", "exp_avg", index=(slice(10, 20), 3)), (w0 * 2)[10:20, 3])
    assert ck.read("b/x").view(torch.int16).tolist() == b.view(torch.int16).tolist()
    assert torch.equal(ck.metadata["rng"], torch.get_rng_state())
    assert verify(url, storage_options=s3) == []
    g = zarr.open_group(url, mode="r", storage_options=s3)
    assert (g["layers.0.w"]["param"][...] == w0.numpy()).all()
    # create refuses the non-empty prefix; a corrupted object is caught
    with pytest.raises(Exception, match="not empty"):
        create_checkpoint(url, storage_options=s3)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]}, key="x", secret="x")
    key = "ucp-test/ck/layers.0.w/param/c/0/0"
    data = bytearray(fs.cat_file(key))
    data[5] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    assert any("c/0/0" in p for p in verify(url, storage_options=s3))
    with pytest.raises(CorruptChunkError):
        open_checkpoint(url, storage_options=s3).read("layers.0.w")
    fs.rm_file("ucp-test/ck/ucp.manifest.json")
    with pytest.raises(NotCommittedError):
        open_checkpoint(url, storage_options=s3)
    # overwrite clears the prefix first
    with create_checkpoint(url, storage_options=s3, overwrite=True) as w:
        w.write_tensor("z", "param", torch.ones(2))
    assert open_checkpoint(url, storage_options=s3).params == ["z"]


def test_s3_sharded_partial_reads(s3):
    import zarr

    url = "s3://ucp-test/sharded"
    t = torch.randn(200, 64)
    with create_checkpoint(url, storage_options=s3, shard_bytes=16384, inner_bytes=1024) as w:
        a = w.add_array("w", "param", t.shape, t.dtype)
        a.write((60, 0), t[60:])
        a.write((0, 0), t[:60])
    assert a.inner is not None and a.inner[1] == 8
    ck = open_checkpoint(url, storage_options=s3)
    assert torch.equal(ck.read("w"), t)
    got = ck.read("w", index=(slice(None), slice(16, 32)))
    assert torch.equal(got, t[:, 16:32])
    s = ck.last_read_stats
    assert s["bytes_read"] <= 1.1 * s["bytes_needed"] + 2 * 4 * 1024, s  # + one index read per shard
    assert verify(url, storage_options=s3) == []
    g = zarr.open_group(url, mode="r", storage_options=s3)
    assert (g["w"]["param"][...] == t.numpy()).all()
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]}, key="x", secret="x")
    key = "ucp-test/sharded/w/param/c/0/0"
    data = bytearray(fs.cat_file(key))
    data[5] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    assert any("c/0/0" in p for p in verify(url, storage_options=s3))
    with pytest.raises(CorruptChunkError):
        open_checkpoint(url, storage_options=s3).read("w", index=(slice(0, 2), slice(0, 8)))


def test_cli_convert_to_s3_verify_and_export_back(s3, tmp_path, capsys):
    """The user path: `ucp convert` straight into S3, `ucp verify` / `inspect` there, and
    `ucp export` from S3 to another parallelism, equal to the original bit for bit."""
    import json

    from ucp.cli import main
    from ucp.demo import DEMO_SPEC
    from ucp.sources.ranks import load_ranks_full
    from ucp.targets.ranks import save_ranks

    g = torch.Generator().manual_seed(3)
    shapes = {"model.embed_tokens.weight": (301, 40), "model.norm.weight": (40,),
              "lm_head.weight": (301, 40)}
    states = {st: {n: torch.randn(s, generator=g) for n, s in shapes.items()} for st in ("param", "exp_avg")}
    save_ranks(states, tmp_path / "src", spec_text=DEMO_SPEC, degrees={"tp": 2, "dp": 2})
    so = json.dumps(s3)
    url = "s3://ucp-test/cli-ck"
    assert main(["convert", str(tmp_path / "src"), url, "--storage-options", so, "-q"]) == 0
    assert main(["verify", url, "--storage-options", so]) == 0
    assert main(["inspect", url, "--storage-options", so, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["num_params"] == 3
    assert main(["export", url, str(tmp_path / "tp3"), "--to", "ranks", "--tp", "3",
                 "--storage-options", so, "-q"]) == 0
    back = load_ranks_full(tmp_path / "tp3")
    for st in states:
        for n, t in states[st].items():
            assert torch.equal(back[st][n], t), (st, n)


def test_an_unreachable_store_is_one_error_line(tmp_path):
    """An object store that cannot be reached (a loopback port nothing listens on) ends the command
    with one error line naming the store client's error, exit 2, not a botocore traceback."""
    import json

    from ucp.demo import DEMO_SPEC
    from ucp.targets.ranks import save_ranks

    port = free_port()              # a port just freed: nothing listens there
    save_ranks({"param": {"model.norm.weight": torch.ones(8), "lm_head.weight": torch.ones(10, 8)}},
               tmp_path / "src", spec_text=DEMO_SPEC, degrees={"tp": 2})
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    got = subprocess.run([sys.executable, "-m", "ucp", "convert", "-q", str(tmp_path / "src"), "s3://bkt/u",
                          "--storage-options", json.dumps(opts)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr and got.stderr.startswith("ucp convert: error: EndpointConnectionError")
