"""The device kit's file logic: split large files into parts packed into per-call folders,
check the parts, put them back together, and plan the device calls (tools/device_kit.sh).

A device call carries at most 64 MiB, the repository included, so a 276 MB wheel travels as
parts over several consecutive calls. ``split`` cuts the files, in order, into parts of at most
``part_size`` bytes and fills call folders ``c01/, c02/ ...`` up to ``call_budget`` bytes each;
``manifest.json`` (copied into every call folder) lists each file's size and sha256 and each
part's name, size, sha256 and call. ``stash`` copies the parts a call brought into a cache,
``assemble`` rebuilds the files from it and checks every part and every whole file; a missing
or corrupted part is reported by name. Standard library only: it runs on the device before
anything is installed, as ``python3 megatron_srp/deploy/device_kit.py ...``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
MANIFEST = "manifest.json"
CALL_LIMIT = 64 * MIB          # what one device call carries, the working tree included
COMMAND_LIMIT = 2000           # characters in one device call's command


class KitError(RuntimeError):
    """A part or file is missing or does not match the manifest."""


def sha256_file(path: Path, chunk: int = 4 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _copy_range(src: Path, dst: Path, offset: int, length: int) -> str:
    """Copy ``length`` bytes of ``src`` from ``offset`` into ``dst``; returns their sha256."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fi.seek(offset)
        left = length
        while left:
            block = fi.read(min(4 * MIB, left))
            if not block:
                raise KitError(f"{src} ended early")
            h.update(block)
            fo.write(block)
            left -= len(block)
    return h.hexdigest()


def split(files: list[Path], out_dir: Path, part_size: int, call_budget: int,
          extra: dict | None = None) -> dict:
    """Cut ``files`` (in this order) into parts and pack them into call folders under
    ``out_dir``; write and return the manifest. Earlier call folders are removed first."""
    if part_size <= 0 or call_budget <= 0:
        raise ValueError("part_size and call_budget must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("c[0-9][0-9]"):
        shutil.rmtree(old)
    entries, call, room = [], 1, call_budget
    for path in files:
        size, offset, parts = path.stat().st_size, 0, []
        while offset < size or (size == 0 and not parts):
            if room == 0:
                call, room = call + 1, call_budget
            n = min(part_size, room, size - offset)
            name = f"{path.name}.part{len(parts):03d}"
            folder = out_dir / f"c{call:02d}"
            folder.mkdir(exist_ok=True)
            digest = _copy_range(path, folder / name, offset, n)
            parts.append({"name": name, "size": n, "sha256": digest, "call": call})
            offset, room = offset + n, room - n
            if size == 0:
                break
        entries.append({"file": path.name, "size": size, "sha256": sha256_file(path),
                        "parts": parts})
    manifest = {"part_size": part_size, "call_budget": call_budget, "calls": call,
                "files": entries, **(extra or {})}
    text = json.dumps(manifest, indent=1)
    (out_dir / MANIFEST).write_text(text)
    for c in range(1, call + 1):
        (out_dir / f"c{c:02d}" / MANIFEST).write_text(text)
    return manifest


def load_manifest(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for p in (d / name, *d.glob(f"c[0-9][0-9]/{name}")):
            if p.is_file():
                return p
    return None


def check_part(part: dict, path: Path | None) -> str | None:
    """None when the part at ``path`` is the manifest's, else why not (naming the part)."""
    if path is None:
        return f"missing part {part['name']} (call {part['call']})"
    if path.stat().st_size != part["size"]:
        return (f"corrupted part {part['name']} (call {part['call']}): size "
                f"{path.stat().st_size} != {part['size']}")
    if sha256_file(path) != part["sha256"]:
        return f"corrupted part {part['name']} (call {part['call']}): sha256 mismatch"
    return None


def stash(manifest: dict, search: list[Path], cache: Path) -> tuple[list[str], list[str]]:
    """Copy every checked part found under ``search`` into ``cache``; returns (the parts now
    in the cache, the problems: missing or corrupted parts, by name)."""
    cache.mkdir(parents=True, exist_ok=True)
    have, problems = [], []
    for entry in manifest["files"]:
        for part in entry["parts"]:
            cached = cache / part["name"]
            if cached.is_file() and check_part(part, cached) is None:
                have.append(part["name"])
                continue
            src = _find(part["name"], search)
            why = check_part(part, src)
            if why is None:
                shutil.copyfile(src, cached)
                have.append(part["name"])
            else:
                problems.append(why)
    return have, problems


def assemble(manifest: dict, search: list[Path], dest: Path) -> list[Path]:
    """Rebuild every file from its parts into ``dest``, checking each part and each whole
    file. Raises KitError listing every missing or corrupted part by name."""
    problems = [why for e in manifest["files"] for p in e["parts"]
                if (why := check_part(p, _find(p["name"], search))) is not None]
    if problems:
        raise KitError("; ".join(problems))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in manifest["files"]:
        target = dest / entry["file"]
        if not (target.is_file() and target.stat().st_size == entry["size"]
                and sha256_file(target) == entry["sha256"]):
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as fo:
                for part in entry["parts"]:
                    with open(_find(part["name"], search), "rb") as fi:
                        shutil.copyfileobj(fi, fo, 4 * MIB)
            if sha256_file(tmp) != entry["sha256"]:
                tmp.unlink()
                raise KitError(f"{entry['file']}: sha256 of the reassembled file mismatch")
            os.replace(tmp, target)
        out.append(target)
    return out


def tree_bytes(repo: Path) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked and
    untracked-not-ignored files (and shared/ where it exists)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    total = sum((repo / n).stat().st_size for n in names if n and (repo / n).is_file())
    shared = repo / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


def plan(manifest: dict, kit_dir: str, tree: int, stages: dict[int, str] | None = None
         ) -> list[dict]:
    """One row per device call: what it carries, its bytes with the tree, and its command."""
    rows, last = [], manifest["calls"]
    tree += len(json.dumps(manifest, indent=1))     # the manifest travels in every call
    for c in range(1, last + 1):
        parts = sum(p["size"] for e in manifest["files"] for p in e["parts"] if p["call"] == c)
        stage = (stages or {}).get(c, "install" if c == last else "stash")
        rows.append({"call": c, "carry": [f"{kit_dir}/c{c:02d}"], "bytes": parts + tree,
                     "command": f"bash tools/device_kit.sh device {stage}"})
    rows.append({"call": last + 1, "carry": [], "bytes": tree,
                 "command": "bash tools/device_kit.sh device checks"})
    for r in rows:
        if r["bytes"] > CALL_LIMIT:
            raise KitError(f"call {r['call']} would send {r['bytes']} bytes > {CALL_LIMIT}")
        if len(r["command"]) > COMMAND_LIMIT:
            raise KitError(f"call {r['call']}: command longer than {COMMAND_LIMIT} characters")
    return rows


def fetch_sdist(name: str, version: str, dest: Path,
                index: str = "https://pypi.org/simple") -> Path:
    """Download a source distribution through the registry's simple index (JSON form) and
    check it against the sha256 the index gives. ``pip download`` cannot fetch
    transformer-engine-torch without CUDA: it builds the metadata, which needs nvcc."""
    import urllib.request
    norm = name.lower().replace("_", "-")
    req = urllib.request.Request(f"{index}/{norm}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        files = json.load(r)["files"]
    stem = f"{norm.replace('-', '_')}-{version}.tar.gz"
    hit = [f for f in files if f["filename"].lower() == stem]
    if not hit:
        raise KitError(f"no sdist {stem} in {index}/{norm}/")
    target = dest / hit[0]["filename"]
    dest.mkdir(parents=True, exist_ok=True)
    if not (target.is_file() and sha256_file(target) == hit[0]["hashes"]["sha256"]):
        with urllib.request.urlopen(hit[0]["url"], timeout=600) as r, open(target, "wb") as f:
            shutil.copyfileobj(r, f, 4 * MIB)
        if sha256_file(target) != hit[0]["hashes"]["sha256"]:
            raise KitError(f"{target.name}: sha256 differs from the index's")
    return target


def _size(text: str) -> int:
    """'56M', '512K', '1048576' -> bytes (binary units)."""
    mult = {"K": 1 << 10, "M": MIB, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut files into parts packed into call folders")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--part-size", type=_size, default=_size(os.environ.get("KIT_PART_SIZE",
                                                                             "56M")))
    s.add_argument("--call-budget", type=_size, default=None,
                   help="bytes of parts per call (default: the part size)")
    s.add_argument("--meta", default="{}", help="JSON object merged into the manifest")
    for name in ("stash", "assemble"):
        a = sub.add_parser(name)
        a.add_argument("--manifest", type=Path, required=True)
        a.add_argument("--search", type=Path, action="append", required=True)
        a.add_argument("--dest", type=Path, required=True)
    f = sub.add_parser("fetch-sdist", help="download a source distribution, hash-checked")
    f.add_argument("spec", help="NAME==VERSION")
    f.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("plan", help="the device calls: carry lists and commands")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--kit-dir", default="device_kit/calls")
    p.add_argument("--repo", type=Path, default=Path("."))
    p.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        m = split(args.files, args.out, args.part_size, args.call_budget or args.part_size,
                  json.loads(args.meta))
        n = sum(len(e["parts"]) for e in m["files"])
        print(f"{len(m['files'])} files, {n} parts, {m['calls']} calls -> {args.out}")
    elif args.cmd == "stash":
        have, problems = stash(load_manifest(args.manifest), args.search, args.dest)
        total = sum(len(e["parts"]) for e in load_manifest(args.manifest)["files"])
        print(f"parts in cache: {len(have)}/{total}")
        for why in problems:
            print("  still to come:" if why.startswith("missing") else "  BAD:", why)
        return 1 if any(not w.startswith("missing") for w in problems) else 0
    elif args.cmd == "assemble":
        try:
            for path in assemble(load_manifest(args.manifest), args.search, args.dest):
                print(f"ok {path.name} {path.stat().st_size} bytes sha256 verified")
        except KitError as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 1
    elif args.cmd == "fetch-sdist":
        name, version = args.spec.split("==")
        print(fetch_sdist(name, version, args.dest))
    elif args.cmd == "plan":
        rows = plan(load_manifest(args.manifest), args.kit_dir, tree_bytes(args.repo))
        if args.json:
            print(json.dumps(rows, indent=1))
        for r in rows if not args.json else []:
            print(f"call {r['call']}: carry={json.dumps(r['carry'])} "
                  f"({r['bytes'] / MIB:.1f} MiB with the tree)\n  command: {r['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
