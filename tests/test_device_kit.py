"""The device kit's split / reassemble / checksum logic (megatron_srp/deploy/device_kit.py) on a
few generated MiB with a small part size: byte-for-byte reassembly, calls within budget,
missing and corrupted parts named, the per-call stash, the plan's limits."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srp.deploy import device_kit as dk

REPO = Path(__file__).resolve().parents[1]
KIB = 1 << 10


@pytest.fixture()
def kit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = __import__("random").Random(7)
    sizes = {"big-1.0-py3-none-any.whl": 3 * dk.MIB + 12_345, "small.whl": 40 * KIB,
             "empty.txt": 0, "pkg-2.0.tar.gz": 700 * KIB + 1}
    files = []
    for name, size in sizes.items():
        p = src / name
        p.write_bytes(rng.randbytes(size))
        files.append(p)
    manifest = dk.split(files, tmp_path / "calls", part_size=512 * KIB, call_budget=1 * dk.MIB)
    return files, manifest, tmp_path


def test_split_respects_part_size_and_call_budget(kit):
    files, m, tmp = kit
    total = sum(f.stat().st_size for f in files)
    assert m["calls"] == -(-total // dk.MIB)           # packed: no call left half empty
    per_call = {}
    for e in m["files"]:
        assert sum(p["size"] for p in e["parts"]) == e["size"]
        for p in e["parts"]:
            assert p["size"] <= 512 * KIB
            per_call[p["call"]] = per_call.get(p["call"], 0) + p["size"]
            assert (tmp / "calls" / f"c{p['call']:02d}" / p["name"]).stat().st_size == p["size"]
    assert max(per_call.values()) <= dk.MIB and len(per_call) == m["calls"]
    big = m["files"][0]
    assert len(big["parts"]) >= 7 and big["sha256"] == hashlib.sha256(
        files[0].read_bytes()).hexdigest()
    for c in range(1, m["calls"] + 1):                  # every call folder has the manifest
        assert json.loads((tmp / "calls" / f"c{c:02d}" / "manifest.json").read_text()) == m


def test_reassembly_is_byte_for_byte(kit):
    files, m, tmp = kit
    out = dk.assemble(m, [tmp / "calls"], tmp / "out")
    assert [p.name for p in out] == [f.name for f in files]
    for a, b in zip(out, files):
        assert a.read_bytes() == b.read_bytes()


def test_corrupted_part_is_named(kit):
    _, m, tmp = kit
    part = m["files"][0]["parts"][3]
    path = tmp / "calls" / f"c{part['call']:02d}" / part["name"]
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF                                  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(dk.KitError, match=rf"corrupted part {part['name']}.*sha256"):
        dk.assemble(m, [tmp / "calls"], tmp / "out")
    assert not (tmp / "out").exists()


def test_truncated_and_missing_parts_are_named(kit):
    _, m, tmp = kit
    short, gone = m["files"][0]["parts"][1], m["files"][3]["parts"][-1]
    p = tmp / "calls" / f"c{short['call']:02d}" / short["name"]
    p.write_bytes(p.read_bytes()[:-1])
    (tmp / "calls" / f"c{gone['call']:02d}" / gone["name"]).unlink()
    with pytest.raises(dk.KitError) as err:
        dk.assemble(m, [tmp / "calls"], tmp / "out")
    assert f"corrupted part {short['name']}" in str(err.value)
    assert f"missing part {gone['name']} (call {gone['call']})" in str(err.value)


def test_stash_call_by_call_then_assemble(kit):
    files, m, tmp = kit
    cache, total = tmp / "cache", sum(len(e["parts"]) for e in m["files"])
    for c in range(1, m["calls"] + 1):
        have, problems = dk.stash(m, [tmp / "calls" / f"c{c:02d}"], cache)
        assert len(have) == sum(1 for e in m["files"] for p in e["parts"] if p["call"] <= c)
        assert len(problems) == total - len(have)
        assert all(w.startswith("missing part") for w in problems)
        if c < m["calls"]:
            with pytest.raises(dk.KitError, match="missing part"):
                dk.assemble(m, [cache], tmp / "early")
    out = dk.assemble(m, [cache], tmp / "out")
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(out, files))


def test_plan_fits_a_call_and_the_command_limit(kit):
    _, m, _ = kit
    rows = dk.plan(m, "device_kit/calls", tree=2 * dk.MIB)
    assert len(rows) == m["calls"] + 1
    assert rows[0]["command"].endswith("device stash")
    assert rows[m["calls"] - 1]["command"].endswith("device install")
    assert rows[-1]["command"].endswith("device checks") and rows[-1]["carry"] == []
    assert all(r["bytes"] <= dk.CALL_LIMIT and len(r["command"]) <= 2000 for r in rows)
    with pytest.raises(dk.KitError, match="would send"):
        dk.plan(m, "device_kit/calls", tree=dk.CALL_LIMIT)


def test_cli_split_with_part_size_from_the_environment(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(300 * KIB))
    env = {**os.environ, "KIT_PART_SIZE": "100K"}
    script = REPO / "megatron_srp" / "deploy" / "device_kit.py"
    subprocess.run([sys.executable, str(script), "split", str(f), "--out",
                    str(tmp_path / "calls")], check=True, env=env, capture_output=True)
    m = dk.load_manifest(tmp_path / "calls" / "manifest.json")
    assert [p["size"] for p in m["files"][0]["parts"]] == [100 * KIB] * 3 and m["calls"] == 3
    proc = subprocess.run([sys.executable, str(script), "assemble", "--manifest",
                           str(tmp_path / "calls" / "manifest.json"), "--search",
                           str(tmp_path / "calls"), "--dest", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "out" / "blob.bin").read_bytes() == f.read_bytes()


def _device(stage, kit_dir, cache, out):
    env = {**os.environ, "KIT_DIR": str(kit_dir), "KIT_CACHE": str(cache), "OUT": str(out),
           "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "tools" / "device_kit.sh"), "device", stage],
                          env=env, capture_output=True, text=True, timeout=120)


def test_shell_device_stash_per_call_and_a_corrupted_part(kit, tmp_path):
    """tools/device_kit.sh's device stage, one carried call folder at a time as on the device:
    the good calls stash their parts, a call with a flipped byte fails naming the part."""
    _, m, tmp = kit
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = _device("stash", tmp_path / "nothing", cache, out)
    assert proc.returncode == 2 and "no manifest" in proc.stdout
    bad = m["files"][0]["parts"][-1]                    # a part of the last call but one
    for c in range(1, m["calls"] + 1):
        carried = tmp_path / f"kit{c}"
        (carried / "calls").mkdir(parents=True)
        src = tmp / "calls" / f"c{c:02d}"
        os.symlink(src, carried / "calls" / src.name)
        if c == bad["call"]:
            path = src / bad["name"]
            path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
        proc = _device("stash", carried, cache, out)
        if c == bad["call"]:
            assert proc.returncode != 0, proc.stdout
            assert f"BAD: corrupted part {bad['name']}" in proc.stdout
            assert not (cache / "parts" / bad["name"]).exists()
            break
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[kit] stash" in proc.stdout and (out / "kit-stash.log").is_file()
    have = sorted(p.name for p in (cache / "parts").iterdir())
    assert have == sorted(p["name"] for e in m["files"] for p in e["parts"]
                          if p["call"] <= bad["call"] and p["name"] != bad["name"])
