"""Saved states on disk: read without running anyone's code, written with a checksum beside the
previous good one.

Reading: a `.pt` is a pickle, and `torch.load(weights_only=False)` runs whatever a crafted one
asks (a state shared by a colleague, a checkpoint in a shared folder). Every state is read with
`weights_only=True`, which builds tensors and plain values only; ours hold nothing else (RNG
states are dicts of ints). A DCP checkpoint (the large run's) has a pickled `.metadata` and
pickled non-tensor entries: both are read with an allow-list (SafeReader, SafePlanner).

Writing (`save`): the file is renamed into place whole (files.write_atomically), its SHA-256
goes to `NAME.sha256`, and with keep_previous the file it replaces becomes `NAME.prev` (with its
checksum). `load_verified` checks the checksum: bytes changed on disk (a bad sector, a copy cut
short, a stray write) are one line, and the previous good state is loaded instead. The large
run's DCP folders get the same guarantee from a manifest of their files' sums (dcp_seal,
dcp_verified).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from windtunnel.errors import ConfigError
from windtunnel.files import write_atomically, write_text

_CHUNK = 1 << 22


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes through it (one pass: no second read to hash)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sums(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save(obj, path: Path, keep_previous: bool = False) -> None:
    """obj to path (torch.save), whole or not at all, with its checksum; keep_previous keeps the
    replaced file as previous(path). Order: a kill between the steps leaves path (checked against
    its own sum) or previous(path) loadable, never only a mismatched pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(obj, hashing)
            digest["sum"] = hashing.h.hexdigest()
        # a damaged file (one a resume just fell back from) never becomes the previous good one
        if keep_previous and path.exists() and check(path) is None:
            if _sums(path).exists():
                os.replace(_sums(path), _sums(previous(path)))
            os.replace(path, previous(path))
        _sums(path).unlink(missing_ok=True)  # a sum never stands beside another file than its own

    write_atomically(path, write)
    write_atomically(_sums(path), lambda tmp: tmp.write_text(f"{digest['sum']}  {path.name}\n"))


def check(path: Path) -> str | None:
    """Why path does not match its recorded checksum; None when it does, or none was recorded."""
    sums = _sums(path)
    if not sums.exists():
        return None
    want = sums.read_text().split()[0] if sums.read_text().strip() else ""
    got = sha256(path)
    return None if got == want else f"its SHA-256 is {got[:12]}..., {sums.name} records {want[:12]}..."


def load(path: Path, where: str, map_location="cpu"):
    """torch.load(path, weights_only=True); a pickle that asks for anything but tensors and plain
    values is refused, unexecuted, with one line naming where (the field that gave path)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        what = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), None)
        if what is not None:
            raise ConfigError(f"{where}: {path} holds Python objects other than tensors and plain values "
                              f"({what[:120]}); refused without running them: only load states you trust, "
                              "saved by windtunnel") from None
        op = re.search(r"Unsupported operand (\d+)", text)
        if op:  # not a pickle at all (a text file): say it as plain pickle does
            raise pickle.UnpicklingError(f"invalid load key, {chr(int(op.group(1)))!r}.") from None
        raise


def load_verified(path: Path, where: str, map_location="cpu"):
    """load(path), or, when path does not match its checksum, one line saying so and the previous
    good state (previous(path)) instead; a ConfigError when neither is good."""
    bad = check(path)
    if bad is None:
        return load(path, where, map_location)
    prev = previous(path)
    if prev.exists() and check(prev) is None:
        _say(f"{where}: {path} is damaged ({bad}); resuming from the previous checkpoint {prev}")
        return load(prev, where, map_location)
    raise ConfigError(f"{where}: {path} is damaged ({bad}) and no good previous checkpoint is beside it; "
                      "delete it to start again")


def _say(line: str) -> None:
    sys.stderr.write(f"windtunnel: {line}\n")
    sys.stderr.flush()


# -- DCP (the large run) ----------------------------------------------------------------------------


def _dcp_globals() -> dict[tuple[str, str], object]:
    from torch.distributed.checkpoint import filesystem, metadata

    out = {(c.__module__, c.__name__): c for c in (
        filesystem._StorageInfo, metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta,
        metadata.TensorProperties, metadata.TensorStorageMetadata, metadata.ChunkStorageMetadata,
        metadata.BytesStorageMetadata, metadata._MEM_FORMAT_ENCODING)}
    out[("torch", "Size")] = torch.Size
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    out[("pathlib", "PosixPath")] = pathlib.PosixPath
    out[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` names only its own dataclasses, torch sizes, dtypes and layouts: anything
    else (os.system, a module's function) is refused before it is looked up."""

    allowed: dict = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} in a DCP checkpoint's "
                                         ".metadata") from None


def dcp_load(state: dict, path: Path, where: str) -> None:
    """torch.distributed.checkpoint.load(state, path), with the checkpoint's pickles read by
    allow-list (DCP reads them with plain pickle and weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with the allow-list
            _MetadataUnpickler.allowed = _dcp_globals()
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                md = _MetadataUnpickler(f).load()
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:  # DefaultLoadPlanner's, with weights_only
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    dcp_metadata(path, where)  # read here first: inside dcp.load a refusal is a generic error among others
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except dcp.api.CheckpointException as e:  # DCP wraps a rank's exception (a BaseException)
        fails = getattr(e, "failures", {}).values()
        text = "\n".join([str(e), *(str(f[0] if isinstance(f, tuple) else f) for f in fails)])
        if "Weights only load failed" not in text and "Unsupported global" not in text:
            raise
        raise _refused(where, path, next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln),
                                         "a pickled entry")) from None


def _refused(where: str, path: Path, why: str) -> ConfigError:
    return ConfigError(f"{where}: {path} holds Python objects other than tensors and plain values "
                       f"({why[:120]}); refused without running them: only load checkpoints you trust")


def dcp_metadata(path: Path, where: str):
    """A DCP checkpoint's `.metadata` (its tensors' names, shapes and dtypes), read by allow-list."""
    try:
        with open(Path(path) / ".metadata", "rb") as f:
            _MetadataUnpickler.allowed = _dcp_globals()
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise _refused(where, path, str(e).splitlines()[0]) from None
    except (OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{where}: {path} is not a readable DCP checkpoint (.metadata: {e})") from None


# -- DCP checksums (the large run) ------------------------------------------------------------------
# A DCP checkpoint is a folder of shards (one or more per rank), .metadata and meta.json. After a
# save, its manifest (MANIFEST, sha256sum's format: `sha256sum -c checksums.sha256` checks it by
# hand) records every file's SHA-256; a resume checks them and, on a mismatch, says so in one line,
# moves the damaged folder aside and resumes from the newest good checkpoint before it (the large
# run never prunes the one before its newest). The ranks share the hashing, a file each in turn.

MANIFEST = "checksums.sha256"
DAMAGED = "damaged-"  # the prefix of a checkpoint moved aside: no reader takes it for a step


def _gather(mine: dict, world: int) -> dict:
    """Every rank's share, merged, on every rank (a collective when world > 1)."""
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def dcp_hash(folder: Path, rank: int = 0, world: int = 1, names: list[str] | None = None) -> dict[str, str]:
    """{name: SHA-256} of folder's files (or `names`; '' for one that is missing), rank r hashing
    every world-th: every rank calls it and gets the whole map."""
    names = _files(folder) if names is None else sorted(names)
    return _gather({n: sha256(folder / n) if (folder / n).is_file() else "" for n in names[rank::world]}, world)


def dcp_seal(folder: Path, sums: dict[str, str]) -> None:
    """folder's manifest: `sums` (dcp_hash's, taken after the DCP save) and the SHA-256 of every
    file written since (meta.json). Rank 0 only, before the folder is renamed into place."""
    lines = [f"{sums.get(n) or sha256(folder / n)}  {n}\n" for n in _files(folder)]
    write_text(folder / MANIFEST, "".join(lines))


def dcp_check(folder: Path, rank: int = 0, world: int = 1) -> str | None:
    """Why folder's files do not match its manifest; None when they do, or it has none (saved
    before manifests were written). Every rank calls it and gets the same answer."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    want = {name: digest for digest, name in (line.split("  ", 1) for line in manifest.read_text().splitlines()
                                              if "  " in line)}
    if ".metadata" not in want:  # cut short or garbled: it cannot vouch for the shards
        return f"{MANIFEST} does not list .metadata"
    got = dcp_hash(folder, rank, world, list(want))
    for name in sorted(want):
        if got[name] != want[name]:
            return (f"{name} is missing" if not got[name] else
                    f"{name}: its SHA-256 is {got[name][:12]}..., {MANIFEST} records {want[name][:12]}...")
    return None


def dcp_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dcp_verified(path: Path, where: str, rank: int = 0, world: int = 1, fallback: bool = True) -> Path:
    """path when its files match its manifest. Else, with fallback (path is the run's newest):
    one line saying so, path moved aside to damaged-NAME, `latest` beside it pointed at the newest
    good checkpoint before it, and that one returned; a ConfigError when there is none (or no
    fallback: a train.init_from). Every rank calls it and gets the same answer."""
    bad = dcp_check(path, rank, world)
    if bad is None:
        return path
    step = dcp_step(path)
    older = sorted(((s, p) for p in path.parent.iterdir()
                    if p.is_dir() and p != path and not p.name.startswith((".", DAMAGED))
                    and (s := dcp_step(p)) is not None and (step is None or s <= step)), reverse=True)
    for _, prev in older if fallback else ():
        if dcp_check(prev, rank, world) is None:
            aside = path.with_name(DAMAGED + path.name)
            if rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                write_text(path.parent / "latest", prev.name + "\n")
                _say(f"{where}: {path} is damaged ({bad}); moved to {aside.name}, resuming from the previous "
                     f"checkpoint {prev}")
            return prev  # the other ranks need not wait: none of them reads the folder moved aside
    raise ConfigError(f"{where}: {path} is damaged ({bad})" + (
        " and no good previous checkpoint is beside it; move it aside to start again" if fallback else ""))
