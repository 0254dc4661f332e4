"""HF-format export: the one artefact every stage hands to the next stage, to transformers and to vLLM.

Layout of an export at ``<run>/export`` (the path users pass to ``init_from`` and ``from_pretrained``)::

    <run>/export -> export.3           a relative symlink, flipped atomically to each new version
    <run>/export.3/                    model + processor (save_pretrained), vlm_post_export.json (provenance)
    <run>/export.3/vlm_post_manifest.json   size and sha256 of every other file in the folder

A new export is written to a temporary sibling ``.export.<random>``, hashed into its manifest, fsynced,
renamed to the next version and swapped in by ``os.replace`` of a symlink; only then is the old version
deleted. A kill at any moment leaves ``<run>/export`` the old export or the new one, complete; what the kill
left beside it (``export_leftovers``) is removed by the next ``fit`` (``vlm_post.checkpoint_io``).

``verify_hf_folder`` checks a folder before its weights load: against its manifest by sha256, or, for a
folder without one (a hub model, an export written before manifests), the safetensors headers and sizes.
Every failure is one ``ConfigError`` line naming the file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlm_post.errors import ConfigError, RunStopped
from vlm_post.fs import fsync_dir

MANIFEST = "vlm_post_manifest.json"
PROVENANCE = "vlm_post_export.json"
MANIFEST_FORMAT = "vlm_post-export-manifest/1"
_HASH_CHUNK = 16 << 20  # stream files through sha256 in 16 MiB reads: 15 GB never sits in memory
_REPAIR = "copy the export folder again whole, or export it again"
_RECOPY = "copy or download the folder again"  # no manifest: not necessarily ours to export again


# --- writing ------------------------------------------------------------------------------------


def export_hf(
    model: torch.nn.Module,
    processor,
    out_dir: str | Path,
    state_dict: dict | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write model + processor with ``save_pretrained`` to ``out_dir``, replacing any export there atomically.

    ``state_dict``: the full weights to write instead of the model's own (an FSDP-sharded model's, gathered by
    ``vlm_post.models.sharding.full_state_dict``). ``provenance``: what the export holds (checkpoint, step,
    score), written to ``vlm_post_export.json`` inside it. Weights with a NaN or inf raise ``RunStopped`` before
    anything is written, so the previous export stays as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    refuse_nonfinite_weights(state_dict if state_dict is not None else model.state_dict(), out_dir)
    tmp = _temporary_name(out_dir, "")
    tmp.mkdir()  # not mkdtemp: its mode 0700 would stay on the export, unreadable to a server run by another user
    try:
        _write_export(tmp, model, processor, state_dict, provenance)
        write_manifest(tmp)
        _fsync_tree(tmp)
        version = _next_version(out_dir)
        os.rename(tmp, version)
        _point_to(out_dir, version)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in _stale_versions(out_dir):  # the version just replaced (and any a kill left)
        discard(stale, out_dir)
    return out_dir


def refuse_nonfinite_weights(state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Raise ``RunStopped`` rather than export a NaN or inf: the next stage would load it without a word."""
    bad = [name for name, tensor in state.items() if _is_nonfinite(tensor)]
    if bad:
        kept = f"the export already in {out_dir} is as it was"
        if not out_dir.exists():
            kept = f"nothing was written to {out_dir}"
        raise RunStopped(
            f"refusing to export: {len(bad)} of {len(state)} weight tensors are non-finite (first: {bad[0]}); {kept}"
        )


def _is_nonfinite(tensor: torch.Tensor) -> bool:
    # In slices: isfinite of a whole 7B model's embedding would allocate another half gigabyte at once.
    parts = tensor.flatten().split(1 << 24) if tensor.is_floating_point() else ()
    return not all(bool(part.isfinite().all()) for part in parts)


def _write_export(folder: Path, model: torch.nn.Module, processor, state_dict: dict | None, provenance: dict | None):
    architectures = [_unwrapped_class(model).__name__]
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") != architectures:  # FSDP2 renames the class to FSDP<name>
        config["architectures"] = architectures
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(folder)
    # "manifest" tells a manifest deleted later apart from an export written before manifests existed.
    (folder / PROVENANCE).write_text(json.dumps({**(provenance or {}), "manifest": MANIFEST}, indent=2) + "\n")


def _unwrapped_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass named ``FSDP<name>``."""
    cls = type(model)
    return next((base for base in cls.__mro__[1:] if base.__name__ == cls.__name__.removeprefix("FSDP")), cls)


def write_manifest(folder: Path) -> dict:
    """Record the size and sha256 of every file in ``folder`` (but the manifest) in ``vlm_post_manifest.json``."""
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, sha256_of_each(paths))
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files, "files_sha256": _table_digest(files)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_each(paths: list[Path]) -> list[str]:
    """sha256 of each file, a few at a time: hashlib releases the GIL, and a 7B export is 4 shards."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256_of, paths))


def _table_digest(files: dict) -> str:
    """The checksum of the manifest's own table, so that an edited manifest is told apart from a changed file."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync_tree(folder: Path) -> None:
    """Push the files and their folders to disk before they are swapped in (a power cut, not just a kill)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    for directory in (*(p for p in folder.rglob("*") if p.is_dir()), folder):
        fsync_dir(directory)


# --- the swap -----------------------------------------------------------------------------------


def _versions(out_dir: Path) -> dict[int, Path]:
    """The version folders ``<name>.<n>`` beside ``out_dir``, by n."""
    pattern = re.compile(rf"{re.escape(out_dir.name)}\.(\d+)")
    siblings = out_dir.parent.iterdir() if out_dir.parent.is_dir() else ()
    matches = ((pattern.fullmatch(p.name), p) for p in siblings if p.is_dir() and not p.is_symlink())
    return {int(match[1]): p for match, p in matches if match}


def _next_version(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.{max(_versions(out_dir), default=0) + 1}"


def _temporary_name(out_dir: Path, suffix: str) -> Path:
    """A fresh ``.<name>.<random><suffix>`` beside ``out_dir``: the names ``export_leftovers`` may remove."""
    return out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}{suffix}"


def discard(path: Path, out_dir: Path) -> None:
    """Remove a folder or link beside ``out_dir``; a version folder is first renamed to a temporary name, so a
    kill in the middle of deleting it leaves a name the next cleanup knows, not half a version."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    if not path.name.startswith(f".{out_dir.name}."):
        try:
            path = path.rename(_temporary_name(out_dir, ".old"))
        except FileNotFoundError:  # another rank's cleanup took it first
            return
    shutil.rmtree(path, ignore_errors=True)


def _point_to(out_dir: Path, version: Path) -> None:
    """Make ``out_dir`` a symlink to ``version`` in one atomic step, whatever was there."""
    link = _temporary_name(out_dir, ".link")
    os.symlink(version.name, link)  # relative: the run folder can be moved or copied whole
    if out_dir.is_dir() and not out_dir.is_symlink():
        # An export from before versions: a real folder, which rename() cannot replace by a symlink.
        _exchange(link, out_dir)
        shutil.rmtree(link, ignore_errors=True)  # ``link`` now names the old folder
    else:
        os.replace(link, out_dir)
    fsync_dir(out_dir.parent)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Where the kernel, libc or file system has none (macOS, NFS), fall back to two renames. A kill between them
    leaves no ``b``, the old folder parked at a temporary name and the new version complete beside it:
    ``restore_pointer`` (the next fit) points ``b`` at that version.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
    except AttributeError:  # no renameat2 in this libc
        pass
    parked = _temporary_name(b, ".old")
    os.rename(b, parked)
    os.replace(a, b)
    os.rename(parked, a)


def _stale_versions(out_dir: Path) -> list[Path]:
    """Version folders that no symlink beside ``out_dir`` points to: replaced, or made by a save that was killed.

    A version the user pinned with a link of their own (``best -> export.3``) is not stale.
    """
    return [p for p in _versions(out_dir).values() if (p / MANIFEST).is_file() and not _linked(p, _user_links(out_dir))]


def _user_links(out_dir: Path) -> list[Path]:
    """The symlinks beside ``out_dir``, but the temporary ones ``export_hf`` makes."""
    return [p for p in out_dir.parent.iterdir() if p.is_symlink() and not p.name.startswith(f".{out_dir.name}.")]


def _linked(folder: Path, links: list[Path]) -> bool:
    return any(os.path.realpath(link) == os.path.realpath(folder) for link in links)


def restore_pointer(out_dir: Path) -> Path | None:
    """Where a kill left no ``out_dir`` but a complete version beside it (killed between renaming the new
    version into place and pointing ``out_dir`` at it), point ``out_dir`` at the newest. Returns that version."""
    if out_dir.exists() or out_dir.is_symlink():
        return None
    complete = [p for _, p in sorted(_versions(out_dir).items()) if (p / MANIFEST).is_file()]
    if not complete:
        return None
    _point_to(out_dir, complete[-1])
    return complete[-1]


def export_leftovers(out_dir: Path) -> list[Path]:
    """What a kill inside ``export_hf`` may leave beside ``out_dir``: temporary ``.<name>.*`` folders and links,
    and stale version folders. Never a folder that a symlink there (but our temporary ones) points to."""
    if not out_dir.parent.is_dir():
        return []
    temporary = [p for p in out_dir.parent.glob(f".{out_dir.name}.*") if p.is_symlink() or p.is_dir()]
    links = _user_links(out_dir)
    return [p for p in temporary if p.is_symlink() or not _linked(p, links)] + _stale_versions(out_dir)


# --- verifying ----------------------------------------------------------------------------------

_VERIFIED: set[tuple] = set()  # folders this process has hashed, by the stat of every file: one hash per load
_VERIFIED_LOCK = threading.Lock()


def verify_hf_folder(folder: str | Path, what: str = "model") -> str:
    """Check an HF folder before its weights load; ``ConfigError`` naming the file otherwise.

    Returns ``"sha256"`` when every file matched the export's manifest, ``"structure"`` for a folder without a
    manifest (a hub model, an export from before manifests), whose safetensors headers and sizes were checked
    (bytes changed inside a tensor cannot be seen there).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder, what)
    if manifest is None:
        check_safetensors_structure(folder, what)
        return "structure"
    _check_against_manifest(folder, manifest, what)
    return "sha256"


def _read_manifest(folder: Path, what: str) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        if _provenance(folder).get("manifest"):
            raise ConfigError(
                f"{what}: {path} is missing, though {folder / PROVENANCE} says the export wrote it; {_REPAIR}"
            )
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        recorded = manifest["files_sha256"]
        entries_ok = all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what}: {path} cannot be read ({type(error).__name__}: {error}); {_REPAIR}") from None
    if not entries_ok or _table_digest(files) != recorded:
        raise ConfigError(
            f"{what}: {path} was edited after the export (its table's checksum does not match); {_REPAIR}"
        )
    return manifest


def _provenance(folder: Path) -> dict:
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return {}
    return provenance if isinstance(provenance, dict) else {}


def _check_against_manifest(folder: Path, manifest: dict, what: str) -> None:
    files = manifest["files"]
    _refuse_unlisted_weights(folder, files, what)
    stats = {}
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{what}: {path} is missing (the export's {MANIFEST} lists it); {_REPAIR}")
        stats[name] = path.stat()
        if stats[name].st_size != entry["size"]:
            raise ConfigError(
                f"{what}: {path} is {stats[name].st_size} bytes, the export wrote {entry['size']} "
                f"(truncated or overwritten); {_REPAIR}"
            )
    key = (str(folder.resolve()), *sorted((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats.items()))
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return
    for (name, entry), digest in zip(files.items(), sha256_of_each([folder / name for name in files])):
        if digest != entry["sha256"]:
            raise ConfigError(
                f"{what}: {folder / name} is not the file the export wrote (its sha256 differs from {MANIFEST}'s: "
                f"corrupted or changed since); {_REPAIR}"
            )
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


def _refuse_unlisted_weights(folder: Path, files: dict, what: str) -> None:
    """Weights the manifest does not list would load unverified (other files, a README, are the user's business)."""
    for path in sorted(folder.glob("*")):
        if _is_weights_file(path.name) and path.name not in files:
            raise ConfigError(f"{what}: {path} is not in the export's {MANIFEST} (added after the export?); {_REPAIR}")


def _is_weights_file(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


# --- safetensors structure, for folders without a manifest ------------------------------------------

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_MAX_HEADER = 100 << 20  # what the safetensors library itself accepts
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def check_safetensors_structure(folder: Path, what: str = "model", require_all: bool = True) -> None:
    """Every safetensors file the folder's weights need exists, has a readable header, and is exactly as long
    as its header's offsets say. ``require_all=False`` (a hub snapshot that may still download files) checks
    the files that are there."""
    for path in _safetensors_files(folder, what):
        if path.is_file():
            check_safetensors_file(path, what)
        elif require_all:
            raise ConfigError(f"{what}: {path} is missing; {_RECOPY}")


def _safetensors_files(folder: Path, what: str) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{what}: {index} cannot be read ({type(error).__name__}: {error}); {_RECOPY}") from None
    if (folder / _SINGLE).exists() or not list(folder.glob("*.bin")):
        return [folder / _SINGLE]
    return []  # PyTorch .bin weights: torch reads those, with its own checks


def check_safetensors_file(path: Path, what: str = "model") -> None:
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            raise ConfigError(
                f"{what}: {path} is not a readable safetensors file (its header length is garbled or the file is "
                f"truncated: {size} bytes); {_RECOPY}"
            )
        raw = file.read(length)
    end = _data_end(raw, path, what)
    if size != 8 + length + end:
        raise ConfigError(
            f"{what}: {path} is {size} bytes but its header says {8 + length + end} "
            f"({'truncated' if size < 8 + length + end else 'trailing bytes'}); {_RECOPY}"
        )


def _data_end(raw: bytes, path: Path, what: str) -> int:
    """Where the header says the tensor data ends, after checking each tensor's offsets against its shape."""
    garbled = f"{what}: {path} has a garbled safetensors header"
    try:
        header = json.loads(raw)
        spans = {name: _span(entry) for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not safetensors' JSON
        raise ConfigError(f"{garbled} ({type(error).__name__}: {error}); {_RECOPY}") from None
    for name, (begin, stop, expected) in spans.items():
        if not 0 <= begin <= stop or (expected is not None and stop - begin != expected):
            raise ConfigError(f"{garbled} (tensor {name}: offsets {begin}..{stop} do not fit its shape); {_RECOPY}")
    return max((stop for _, stop, _ in spans.values()), default=0)


def _span(entry: dict) -> tuple[int, int, int | None]:
    """(begin, end, bytes its dtype and shape take, None for a dtype not listed here) of one header entry."""
    begin, stop = (int(offset) for offset in entry["data_offsets"])
    width = _DTYPE_BYTES.get(entry["dtype"])
    return begin, stop, None if width is None else width * math.prod(int(n) for n in entry["shape"])
