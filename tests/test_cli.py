"""The `ucp` command as a user runs it: tables, JSON, exit codes, clear errors."""
import json
import subprocess
import sys

import torch

from ucp.cli import main
from ucp.format import create_checkpoint


def _make(path, scale=1.0, extra=False):
    g = torch.Generator().manual_seed(0)
    with create_checkpoint(path) as w:
        for name, shape, dt in [("emb.weight", (37, 12), torch.float32),
                                ("layers.0.w", (5, 7), torch.bfloat16),
                                ("layers.0.b", (7,), torch.float32)]:
            w.add_param(name, meta={"frozen": name.endswith(".b")})
            t = (torch.randn(shape, generator=g) * scale).to(dt)
            w.write_tensor(name, "param", t)
            w.write_tensor(name, "exp_avg", torch.randn(shape, generator=g))
        if extra:
            w.add_param("extra", meta={})
            w.write_tensor("extra", "param", torch.zeros(3))
        w.set_metadata({"iteration": 7, "lr": 1e-3})
    return path


def test_inspect_shows_a_tied_alias_stored_once(tmp_path, capsys):
    """An alias stored once has no arrays; its row says what it is tied to, with its shape and dtype."""
    import torch.distributed.checkpoint as dcp
    from torch import nn

    from ucp.dcp import UniversalWriter

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(8, 4)
            self.output = nn.Linear(4, 8, bias=False)
            self.output.weight = self.tok_embeddings.weight

    dcp.save(Tied().state_dict(), storage_writer=UniversalWriter(tmp_path / "u"))
    assert main(["inspect", str(tmp_path / "u")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("output.weight"))
    assert row.split() == ["output.weight", "-", "float32", "8x4", "-", "-", "tied->tok_embeddings.weight"]
    assert "2 parameters, 1 arrays" in out
    assert main(["inspect", str(tmp_path / "u"), "--json"]) == 0
    alias = next(p for p in json.loads(capsys.readouterr().out)["params"] if p["name"] == "output.weight")
    assert alias["states"] == [] and alias["shape"] == [8, 4] and alias["dtype"] == "float32"


def test_inspect_table_and_json(tmp_path, capsys):
    p = _make(tmp_path / "a")
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "emb.weight" in out and "bfloat16" in out and "37x12" in out and "frozen" in out
    assert "3 parameters, 6 arrays" in out
    assert main(["inspect", str(p), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_params"] == 3 and s["num_arrays"] == 6
    emb = next(x for x in s["params"] if x["name"] == "emb.weight")
    assert {st["state"] for st in emb["states"]} == {"param", "exp_avg"}
    assert emb["states"][0]["shape"] == [37, 12]
    assert s["metadata_keys"] == ["iteration", "lr"]


def test_verify_ok_then_corrupt_chunk(tmp_path, capsys):
    p = _make(tmp_path / "a")
    assert main(["verify", str(p)]) == 0
    assert "OK" in capsys.readouterr().out
    chunk = next(f for f in sorted((p / "emb.weight" / "param").rglob("*")) if f.is_file() and f.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(p)]) == 1
    out = capsys.readouterr().out
    assert "emb.weight" in out and "FAIL" in out
    assert main(["verify", str(p), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False and any("emb.weight" in x for x in rep["problems"])


def test_verify_missing_manifest_fails(tmp_path, capsys):
    p = _make(tmp_path / "a")
    (p / "ucp.manifest.json").unlink()
    assert main(["verify", str(p)]) != 0
    out = capsys.readouterr()
    assert "manifest" in (out.out + out.err)
    assert main(["inspect", str(p)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_diff_equal_close_and_different(tmp_path, capsys):
    a, b = _make(tmp_path / "a"), _make(tmp_path / "b")
    assert main(["diff", str(a), str(b)]) == 0
    assert "0 differ" in capsys.readouterr().out
    c = _make(tmp_path / "c", scale=1.0 + 1e-6)
    assert main(["diff", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "emb.weight" in out and "differs" in out
    assert main(["diff", str(a), str(c), "--atol", "1e-3"]) == 0
    assert "0 differ beyond atol=0.001" in capsys.readouterr().out
    d = _make(tmp_path / "d", extra=True)
    assert main(["diff", str(a), str(d), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert any(r["param"] == "extra" and r["status"] == "only in B" for r in rep["rows"])


def test_diff_of_complex_tensors_compares_both_parts(tmp_path, capsys):
    """A complex buffer (RoPE's ``freqs_cis``) that differs in its real or imaginary part differs:
    ``ucp diff`` once cast complex values to integers, dropping the imaginary part and the fractions."""
    def make(path, v):
        with create_checkpoint(path) as w:
            w.add_param("freqs")
            w.write_tensor("freqs", "param", torch.tensor(v, dtype=torch.complex64))
        return str(path)

    a = make(tmp_path / "a", [0.1 + 0.2j, 1.0 + 0j])
    for v, d in (([0.1 + 0.7j, 1.0 + 0j], 0.5), ([0.1 + 0.2j, 1.25 + 0j], 0.25)):
        b = make(tmp_path / f"b{d}", v)
        assert main(["diff", a, b, "--json"]) == 1
        row = next(r for r in json.loads(capsys.readouterr().out)["rows"] if r["param"] == "freqs")
        assert row["status"] == "differs" and abs(row["max_abs_diff"] - d) < 1e-6
    assert main(["diff", a, make(tmp_path / "same", [0.1 + 0.2j, 1.0 + 0j])]) == 0


def test_unknown_source_is_a_clear_error(tmp_path, capsys):
    """A checkpoint no registered source recognises, or a --from name nobody registered:
    one line that lists the registered sources, exit 2, nothing written."""
    from ucp.sources import sources

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("not a checkpoint")
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which framework" in err and all(n in err for n in sources())
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "y"), "--from", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown source 'nonsense'" in err and all(n in err for n in sources())
    assert not (tmp_path / "y").exists()
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    p = _make(tmp_path / "a")
    r = subprocess.run([sys.executable, "-m", "ucp", "inspect", str(p), "--json"],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["num_params"] == 3


def test_diff_compares_metadata_with_tensors(tmp_path, capsys):
    def make(path, it, rng):
        with create_checkpoint(path) as w:
            w.add_param("w", meta={})
            w.write_tensor("w", "param", torch.ones(3))
            w.set_metadata({"iteration": it, "rng": rng, "lr": float("nan")})
        return path

    rng = torch.get_rng_state()
    a = make(tmp_path / "a", 5, rng)
    b = make(tmp_path / "b", 5, rng.clone())
    assert main(["diff", str(a), str(b)]) == 0
    assert "metadata equal" in capsys.readouterr().out
    rng2 = rng.clone()
    rng2[100] ^= 1
    c = make(tmp_path / "c", 6, rng2)
    assert main(["diff", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "metadata.iteration" in out and "metadata.rng" in out
    assert main(["diff", str(a), str(c), "--ignore-metadata"]) == 0


def test_export_errors_are_clear(tmp_path, capsys):
    from ucp.demo import DEMO_SPEC
    from ucp.targets.ranks import save_ranks

    states = {"param": {"model.norm.weight": torch.ones(8), "lm_head.weight": torch.ones(10, 8)}}
    save_ranks(states, tmp_path / "src", spec_text=DEMO_SPEC, degrees={"tp": 2})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "u"), "-q"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "x"), "--to", "ranks", "--zero-stage", "2"]) == 2
    assert "--zero-stage" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "x"), "--to", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'nonsense'" in err and "known: " in err and "ranks" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "full"), "--to", "ranks", "--tp", "3"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    # converting into a non-empty destination is refused the same way, with the way out named
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert (tmp_path / "full" / "keep.txt").exists()
    # the command line speaks its own flags, not the Python API's keywords
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "full"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a ucp checkpoint" in err and "--overwrite replaces only" in err and "overwrite=True" not in err
    assert (tmp_path / "full" / "keep.txt").exists()
    # --resume finishes only an interrupted conversion: a folder of other files is not adopted
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "full"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no interrupted ucp write (it holds keep.txt)" in err and "--resume continues only" in err
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "u"), "--overwrite", "-q"]) == 0
    assert main(["verify", str(tmp_path / "u"), "-q"]) == 0
    # a spec with a syntax error names file:line:col
    bad = tmp_path / "bad.ucp"
    bad.write_text('spec b\naxes tp\nparam "**" = shard(0 over=tp)\n')
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "y"), "--to", "ranks", "--spec", str(bad)]) == 2
    assert f"{bad}:3:" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_sources_and_targets_take_file_urls_and_refuse_other_urls(tmp_path, capsys, monkeypatch):
    """Framework files are read and written locally: a ``file://`` URL is its path, any other URL
    is refused by name before anything is written (``Path("s3://b/x")`` is the local folder
    ``s3:/b/x``: an export there reported success and left the bucket empty)."""
    from ucp.demo import DEMO_SPEC
    from ucp.targets.ranks import save_ranks

    monkeypatch.chdir(tmp_path)
    states = {"param": {"model.norm.weight": torch.ones(8), "lm_head.weight": torch.ones(10, 8)}}
    save_ranks(states, tmp_path / "src", spec_text=DEMO_SPEC, degrees={"tp": 2})
    assert main(["convert", f"file://{tmp_path / 'src'}", str(tmp_path / "u"), "-q"]) == 0
    assert main(["export", str(tmp_path / "u"), f"file://{tmp_path / 'x'}", "--to", "ranks", "--tp", "2", "-q"]) == 0
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "u2"), "-q"]) == 0
    assert main(["diff", str(tmp_path / "u"), str(tmp_path / "u2"), "--ignore-metadata"]) == 0
    capsys.readouterr()
    for args in (["convert", "s3://bucket/src", str(tmp_path / "v")],
                 ["convert", "memory://src", str(tmp_path / "v"), "--from", "ranks"],
                 ["export", str(tmp_path / "u"), "s3://bucket/out", "--to", "ranks", "--tp", "2"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "local files only" in err and args[1 if args[0] == "convert" else 2] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "u", "u2", "x"]


def test_numeric_options_and_tags_out_of_range_are_refused(tmp_path, capsys):
    """Degrees, thread counts and sizes below 1, a negative or NaN tolerance and a DeepSpeed tag
    that is not one folder name are usage errors naming the option; nothing is written (``--dp 0``
    wrote a single-rank checkpoint, ``--tag ../x`` a folder beside the destination)."""
    u = _make(tmp_path / "u")
    cases = [(["export", str(u), str(tmp_path / "x"), "--to", "ranks", "--dp", "0"], "--dp"),
             (["export", str(u), str(tmp_path / "x"), "--to", "ranks", "--tp", "-2"], "--tp"),
             (["export", str(u), str(tmp_path / "x"), "--to", "deepspeed", "--zero-stage", "3",
               "--sub-group-size", "-5"], "--sub-group-size"),
             (["convert", str(u), str(tmp_path / "x"), "--workers", "0"], "--workers"),
             (["diff", str(u), str(u), "--atol", "-1"], "--atol"),
             (["diff", str(u), str(u), "--atol", "nan"], "--atol")]
    for tag in ("../escaped", "/abs", "a/b", "..", "gs3 ", " ", "latest", "latest.tmp", "latest_universal"):
        cases.append((["export", str(u), str(tmp_path / "x"), "--to", "deepspeed", "--zero-stage", "2",
                       "--tag", tag], "--tag"))
    for args, flag in cases:
        try:
            code = main(args)
        except SystemExit as e:      # argparse's usage error
            code = e.code
        assert code == 2, args
        assert flag in capsys.readouterr().err, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]
    assert main(["diff", str(u), str(u), "--atol", "0.5"]) == 0
    from ucp.cli import _positive

    assert _positive("1e9") == 10**9 and _positive("12") == 12


def _limited_ucp(args, cwd, max_bytes):
    """``ucp ARGS`` in a process that may write files of at most ``max_bytes`` (RLIMIT_FSIZE:
    the write fails with EFBIG, as a full disk fails with ENOSPC; Python ignores SIGXFSZ)."""
    import resource

    def limit():
        if max_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "ucp", *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit)


def test_a_write_that_fails_is_one_line_naming_the_file_and_resume_finishes(tmp_path):
    """A destination that takes no more bytes (size limit, full disk) ends ``convert`` and
    ``export`` with one error line naming the file and no traceback; ``convert --resume`` then
    finishes the conversion, and the failed export left nothing behind."""
    from ucp.demo import DEMO_SPEC
    from ucp.targets.ranks import save_ranks

    states = {"param": {"model.norm.weight": torch.ones(8), "lm_head.weight": torch.randn(300, 256)}}
    save_ranks(states, tmp_path / "src", spec_text=DEMO_SPEC, degrees={"tp": 2})
    got = _limited_ucp(["convert", "src", "u", "-q"], tmp_path, 100 * 1024)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    assert "File too large" in got.stderr and str(tmp_path / "u") in got.stderr and "--resume" in got.stderr
    assert main(["verify", str(tmp_path / "u"), "-q"]) == 1
    got = _limited_ucp(["convert", "src", "u", "-q", "--resume"], tmp_path, None)
    assert got.returncode == 0, got.stderr
    assert main(["verify", str(tmp_path / "u"), "-q"]) == 0
    got = _limited_ucp(["export", "u", "x", "--to", "ranks", "--tp", "1", "-q"], tmp_path, 100 * 1024)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    assert "x: writing rank.pt failed" in got.stderr and "disk is full or a file-size limit" in got.stderr
    assert not (tmp_path / "x").exists()


def test_from_and_to_help_come_from_the_registries(capsys):
    """Every registered source and target appears in the help with its description, so a
    plug-in needs no change to the CLI."""
    import pytest

    from ucp.sources import sources
    from ucp.targets import targets

    for cmd, registry in (("convert", sources()), ("export", targets())):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at hyphens)
        for name, cls in registry.items():
            listed = f"{name}({''.join(cls.description.split())})" if cls.description else name
            assert listed in out, (cmd, name)


def test_help_and_usage_errors_do_not_import_torch():
    """Building the parser imports every plug-in; none imports torch at module level, so
    ``ucp --help``, ``--version`` and usage errors answer in a fraction of a second instead of
    the ~2 s torch takes to import (commands but ``convert`` and ``verify`` import it once the
    arguments are parsed)."""
    probe = ("import sys\n"
             "from ucp.cli import main\n"
             "for argv in (['--help'], ['--version'], ['convert', '--help'], ['export', '--help'], ['convert']):\n"
             "    try:\n"
             "        main(argv)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-2000:]
    assert "usage: ucp convert" in r.stderr      # the usage error was reached, and reported


def test_verify_runs_without_torch(tmp_path):
    """``ucp verify`` reads bytes and checksums only: with ``import torch`` blocked it checks a
    good checkpoint (exit 0) and finds a corrupted chunk (exit 1, naming it)."""
    _make(tmp_path / "ck")
    probe = ("import sys; sys.modules['torch'] = None\n"
             "from ucp.cli import main\n"
             "sys.exit(main(['verify', sys.argv[1]]))\n")

    def verify():
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path / "ck")], capture_output=True, text=True)

    good = verify()
    assert good.returncode == 0 and "OK" in good.stdout, good.stderr[-2000:]
    chunk = next(p for p in sorted((tmp_path / "ck").rglob("c/*")) if p.is_file() and p.stat().st_size > 8)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    bad = verify()
    assert bad.returncode == 1 and chunk.relative_to(tmp_path / "ck").parts[0] in bad.stdout + bad.stderr, \
        bad.stdout[-2000:] + bad.stderr[-2000:]


def test_demo_refuses_a_folder_holding_files_it_did_not_write(tmp_path, capsys):
    """``ucp demo .`` in a project folder replaced the user's ``universal/`` checkpoint (the name
    every example converts into) without a word; it now takes only a new, empty or earlier demo's
    folder, and leaves everything else alone."""
    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / "ucp.manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", str(tmp_path), "-q"]) == 2
    assert "holds files no demo wrote" in capsys.readouterr().err
    assert main(["demo", f"file://{tmp_path}", "-q"]) == 2          # a file:// URL is that folder
    assert "holds files no demo wrote" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "ucp.manifest.json", "universal"]


def test_a_signal_after_the_command_succeeded_leaves_it_succeeded(tmp_path):
    """Torch takes a second or so to tear down after ``converted ...`` is printed; a Ctrl-C or a
    scheduler's SIGTERM then must not turn the success into a kill (exit -15) or a traceback:
    ``python -m ucp`` ignores signals once the command is over. Synchronised on the child's own
    words: an exit hook (run in teardown) says ``teardown`` and waits until the test closes stdin."""
    import signal

    _make(tmp_path / "a")
    hook = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: (print('teardown', flush=True), sys.stdin.read()))\n"
            "sys.argv = ['ucp', 'verify', sys.argv[1], '-q']\n"
            "runpy.run_module('ucp', run_name='__main__')\n")
    p = subprocess.Popen([sys.executable, "-c", hook, str(tmp_path / "a")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = [p.stdout.readline().strip() for _ in range(2)]
    assert said[0].endswith("OK (every chunk re-read and checksummed)") and said[1] == "teardown", said
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)   # closes stdin: the hook returns
    assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err)
