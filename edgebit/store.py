"""The model store: pulled and converted models on this machine, and how a model argument is found.

Layout (see `edgebit.config` for where the folder is): `models/<name>.gguf` plus a sidecar
`models/<name>.gguf.json` recording source, size and SHA-256 and whether that digest was checked
against a published one. A download goes to `<name>.gguf.part` first and resumes from there with
an HTTP Range request; only a complete file whose digest matches (when one is known) is renamed
into place, so a `.part` file is never used as a model. After a pull everything works offline.

A model argument resolves, in order, as: an existing file path; a model bundled with the package
(`edgebit-sensors`); a registry name or alias (see `edgebit.registry`); a file name in the store,
with or without `.gguf`.

A file in the store is checked before use against the size and SHA-256 the registry publishes
for its name (or the digest it was verified against when pulled), however it got there: pulled,
imported with `edgebit models import`, or copied in by hand. The result is cached in the sidecar
with the file's size and modification time, so a 1.2 GB file is hashed once, not on every load.
Generated random models (`edgebit models random`, `edgebit bench --shape`) live in the store
too, marked `generated` in their sidecar.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__, registry
from .config import cache_dir, models_dir
from .registry import MODELS, RegistryModel, lookup

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds without data before a download attempt fails
PART = ".part"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Files fetched for a "checkpoint" registry entry; the weights are model.safetensors or the shards
# named by model.safetensors.index.json.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")

Progress = Callable[[int, "int | None"], None]  # (bytes done, total bytes or None)


class StoreError(Exception):
    """A model cannot be found, downloaded or removed; the message says what to do."""


class ChecksumError(StoreError):
    """A download or import does not have the expected size or SHA-256 (the file was deleted)."""


class UnreachableError(StoreError):
    """The download host cannot be reached at all (name lookup failed, connection refused, no route):
    not an interrupted download, so retrying at once would not help."""


@dataclass
class StoredModel:
    """A model file in the store and what is known about it."""

    name: str
    path: str
    size: int
    sha256: str | None
    verified: bool  # the digest matched a published one
    source: str | None
    generated: str | None = None  # what made a generated random model (no meaningful text)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict:
    try:
        info = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_sidecar(path: Path, info: dict) -> None:
    tmp = _sidecar(path).with_name(_sidecar(path).name + PART)
    tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
    os.replace(tmp, _sidecar(path))


def _describe(path: Path) -> StoredModel:
    info = _read_sidecar(path)
    return StoredModel(name=path.name[: -len(".gguf")], path=str(path), size=path.stat().st_size,
                       sha256=info.get("sha256"), verified=bool(info.get("verified")), source=info.get("source"),
                       generated=info.get("generated"))


def list_models() -> list[StoredModel]:
    """Every complete model in the store (never `.part` downloads), by name."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return [_describe(p) for p in sorted(folder.glob("*.gguf")) if p.is_file()]


def _in_store(name: str) -> Path | None:
    folder = models_dir()
    for candidate in (name, f"{name}.gguf"):
        if not SAFE_NAME.match(candidate) or not candidate.endswith(".gguf"):
            continue
        path = folder / candidate
        if path.is_file():
            return path
    return None


def find(name: str) -> StoredModel | None:
    """A stored model by registry name/alias or store file name; None if it is not here."""
    entry = lookup(name)
    path = _in_store(entry.store_name if entry else name)
    return _describe(path) if path else None


def resolve(model: str | os.PathLike[str]) -> str:
    """The GGUF file a model argument means: a path, a registry name, or a file in the store."""
    arg = os.fspath(model)
    if arg.endswith(PART):
        raise StoreError(f"{arg} is an incomplete download; run `edgebit pull` again to finish it")
    if os.path.isfile(arg):
        if Path(arg).resolve().parent == models_dir().resolve():
            verify(Path(arg))
        return arg
    shipped = registry.bundled(arg)
    if shipped is not None:
        return shipped
    stored = find(arg)
    if stored is not None:
        verify(Path(stored.path))
        return stored.path
    entry = lookup(arg)
    if entry is not None:
        raise StoreError(f"model {entry.name!r} is not downloaded yet; run `edgebit pull {entry.name}`")
    if os.sep in arg or arg.endswith(".gguf"):
        raise StoreError(f"no such model file: {arg}")
    raise StoreError(f"{arg!r} is not a file, a known model name or a model in the store "
                     f"({models_dir()}); see `edgebit models list`")


def _expected(path: Path) -> tuple[int | None, str | None, str]:
    """(size, SHA-256, whose) a store file must have: the registry's for its name, else the digest
    it was verified against when it was pulled; (None, None, "") when nothing is known."""
    name = path.name[: -len(".gguf")]
    entry = lookup(name)
    if entry is not None and entry.store_name == path.name and (entry.size or entry.sha256):
        return entry.size, entry.sha256, f"published for {entry.name}"
    info = _read_sidecar(path)
    if info.get("verified") and info.get("sha256"):
        return info.get("size"), info["sha256"], f"recorded when {name} was verified"
    return None, None, ""


def verify(path: Path) -> None:
    """Check a store file against its expected size and SHA-256 (see `_expected`) before use.

    A digest is computed only when the sidecar holds no verification of this very file (same size
    and modification time); a success is cached there. Raises StoreError saying what to do.
    """
    size, sha256, whose = _expected(path)
    if size is None and sha256 is None:
        return
    name = path.name[: -len(".gguf")]
    again = f"`edgebit pull {name}` or " if lookup(name) is not None else ""
    fix = (f"delete it with `edgebit models rm {name}`, then {again}`edgebit models import FILE --name {name}` "
           "with a good copy")
    stat = path.stat()
    if size is not None and stat.st_size != size:
        raise StoreError(f"{path}: {stat.st_size} bytes, expected {size} ({whose}): it is incomplete or a "
                         f"different model; {fix}")
    if sha256 is None:
        return
    info = _read_sidecar(path)
    if (info.get("verified") and info.get("sha256") == sha256 and info.get("size") == stat.st_size
            and info.get("mtime_ns") == stat.st_mtime_ns):
        return
    log.warning("checking the SHA-256 of %s (%d bytes) before use; a match is remembered", path, stat.st_size)
    actual = _hash_file(path).hexdigest()
    if actual != sha256.lower():
        raise StoreError(f"{path}: SHA-256 {actual}, expected {sha256} ({whose}): the file is damaged or a "
                         f"different model; {fix}")
    try:
        record(path, info.get("source") or "placed in the store by hand", actual, verified=True)
    except OSError as exc:  # a read-only store still works, it is only hashed again next time
        log.info("cannot cache the verification of %s: %s", path, exc)


def remove(name: str) -> StoredModel:
    """Delete a stored model (and its sidecar and any partial download). Only touches the store."""
    stored = find(name)
    if stored is None:
        raise StoreError(f"no model {name!r} in the store ({models_dir()}); see `edgebit models list`")
    path = Path(stored.path)
    for p in (path, _sidecar(path), path.with_name(path.name + PART)):
        p.unlink(missing_ok=True)
    return stored


# --- downloading


def _request(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": f"edgebit/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)  # noqa: S310


def _total(resp: http.client.HTTPResponse, offset: int) -> int | None:
    content_range = resp.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _hash_file(path: Path, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest


def _attempt(url: str, part: Path, progress: Progress | None) -> tuple[hashlib._Hash, int]:
    """One HTTP request continuing `part`; returns (digest, size) of the complete file or raises."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _request(url, offset)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the part is complete or stale
            resp = None
        else:
            raise StoreError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:  # no HTTP answer at all: name lookup, refused, no route, TLS
        if not isinstance(exc.reason, OSError):
            raise
        host = urllib.parse.urlsplit(url).netloc
        raise UnreachableError(f"cannot reach {host}: {exc.reason.strerror or exc.reason} "
                               f"(downloading {url})") from None
    if resp is None:
        digest = _hash_file(part)
        return digest, offset
    with resp:
        start = offset
        if offset and resp.status != 206:
            log.info("the server ignored the range request; downloading %s from the start", url)
            start = 0
        elif offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise StoreError(f"download of {url}: the server resumed at the wrong offset "
                             f"({resp.headers.get('Content-Range')!r}); delete {part} and pull again")
        total = _total(resp, start)
        digest = _hash_file(part) if start else hashlib.sha256()
        done = start
        if progress:
            progress(done, total)
        with open(part, "r+b" if start else "wb") as fh:
            fh.seek(start)
            fh.truncate()
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                fh.write(block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
            fh.flush()
            os.fsync(fh.fileno())
    if total is not None and done != total:
        raise http.client.IncompleteRead(b"", total - done)
    return digest, done


def download(url: str, dest: str | os.PathLike[str], sha256: str | None = None, size: int | None = None,
             progress: Progress | None = None, retries: int = 2) -> str:
    """Download `url` to `dest` atomically, resuming `dest.part`; return the file's SHA-256.

    `sha256`/`size` (when known) are checked before the file is renamed into place; a mismatch
    deletes the partial file and raises `ChecksumError`. A dropped connection is retried
    `retries` times, each resuming where the last stopped; after that the `.part` file stays for
    the next call to resume. A host that cannot be reached at all (name lookup, refused connection)
    raises `UnreachableError` at once, without retries.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise StoreError(f"only http(s) URLs can be downloaded, not {url!r}")
    dest = Path(dest)
    part = dest.with_name(dest.name + PART)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            digest, got = _attempt(url, part, progress)
            break
        except UnreachableError as exc:
            have = part.stat().st_size if part.exists() else 0
            if have:
                raise UnreachableError(f"{exc}; the {have} bytes downloaded so far stay in {part} for the "
                                       "next pull to resume") from None
            raise
        except (OSError, http.client.HTTPException) as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise StoreError(f"download of {url} was interrupted after {have} bytes ({exc}); run the same "
                                 "command again to resume") from None
            log.warning("download interrupted after %d bytes (%s); resuming", have, exc)
            time.sleep(min(2.0**attempt, 10.0))
    actual = digest.hexdigest()
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: got {got} bytes, expected {size}; the download was deleted")
    if sha256 is not None and actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: SHA-256 {actual} does not match the expected {sha256}; the download "
                            "was deleted")
    os.replace(part, dest)
    return actual


def record(path: str | os.PathLike[str], source: str, sha256: str | None = None, verified: bool = False) -> StoredModel:
    """Write the sidecar of a model file in the store (computing its SHA-256 if not given)."""
    path = Path(path)
    sha256 = sha256 or _hash_file(path).hexdigest()
    stat = path.stat()
    _write_sidecar(path, {"source": source, "sha256": sha256, "verified": verified, "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns, "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return _describe(path)


def record_generated(path: str | os.PathLike[str], what: str) -> StoredModel:
    """Mark a generated random model in the store as such (`what` made it; no digest: nothing to verify)."""
    path = Path(path)
    _write_sidecar(path, {"source": None, "generated": what, "size": path.stat().st_size,
                          "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return _describe(path)


def import_file(source: str | os.PathLike[str], name: str | None = None, sha256: str | None = None,
                copy: bool = False) -> tuple[StoredModel, str]:
    """Put a local GGUF file into the store (hard link when possible, else copy); returns (model, "linked"|"copied").

    Without `name`, a file whose SHA-256 is a registry model's is stored under that model's name,
    any other under its own file name. The size and SHA-256 are checked against the registry (or
    `sha256`) when known; on a mismatch nothing is stored.
    """
    src = Path(source)
    if not src.is_file():
        raise StoreError(f"no such file: {src}")
    entry = lookup(name) if name else None
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{src.name}.{os.getpid()}.import{PART}"
    how = "copied"
    try:
        if not copy:
            try:
                os.link(src, tmp)
                how = "linked"
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        if how == "linked":
            digest = _hash_file(tmp).hexdigest()
        else:
            hasher = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                for block in iter(lambda: fin.read(CHUNK), b""):
                    hasher.update(block)
                    fout.write(block)
            digest = hasher.hexdigest()
        if name is None:
            entry = next((m for m in registry.MODELS if m.sha256 == digest), None)
        stem = name or src.name
        filename = entry.store_name if entry else f"{stem.removesuffix('.gguf')}.gguf"
        if not SAFE_NAME.match(filename):
            raise StoreError(f"{filename!r} is not a usable model file name (letters, digits, '.', '_', '-'); "
                             "choose one with --name")
        expected = sha256 or (entry.sha256 if entry else None)
        size = tmp.stat().st_size
        if entry is not None and entry.size is not None and size != entry.size:
            raise ChecksumError(f"{src}: {size} bytes, but {entry.name} has {entry.size}: an incomplete or "
                                "different file; nothing was stored")
        if expected is not None and digest != expected.lower():
            whose = "the given digest" if sha256 else f"the digest published for {entry.name}"
            raise ChecksumError(f"{src}: SHA-256 {digest} does not match {whose} {expected}; nothing was stored")
        dest = folder / filename
        if dest.exists():
            raise StoreError(f"{dest} is already in the store; remove it first with "
                             f"`edgebit models rm {filename[: -len('.gguf')]}`")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if expected is None:
        log.warning("%s: no published SHA-256 to check against; computed %s (not verified)", filename, digest)
    return record(dest, f"imported from {src.resolve()}", digest, expected is not None), how


def _name_from_url(url: str) -> str:
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    return name if name.endswith(".gguf") else f"{name}.gguf"


def pull(spec: str, name: str | None = None, sha256: str | None = None, progress: Progress | None = None,
         convert_progress: Callable[[int, int], None] | None = None, retries: int = 2) -> StoredModel:
    """Download a registry model (by name or alias) or any GGUF URL into the store.

    A URL may carry the expected `sha256`; `name` sets the stored file name. A model already in
    the store is not downloaded again.
    """
    entry = lookup(spec)
    if entry is None and not spec.startswith(("http://", "https://")):
        raise StoreError(f"{spec!r} is neither a known model name nor an http(s) URL; known models: "
                         f"{', '.join(m.name for m in MODELS)}")
    filename = f"{name}.gguf" if name else (entry.store_name if entry else _name_from_url(spec))
    if not SAFE_NAME.match(filename):
        raise StoreError(f"{filename!r} is not a usable model file name (letters, digits, '.', '_', '-')")
    dest = models_dir() / filename
    if dest.is_file():
        log.info("%s is already in the store", filename)
        verify(dest)
        return _describe(dest)
    try:
        if entry is not None and entry.kind == "checkpoint":
            return _pull_checkpoint(entry, dest, progress, convert_progress, retries)
        url = entry.url() if entry else spec
        expected = sha256 or (entry.sha256 if entry else None)
        digest = download(url, dest, expected, entry.size if entry else None, progress, retries)
    except UnreachableError as exc:
        raise UnreachableError(f"{exc}\n{_offline_hint(entry, spec)}") from None
    if expected is None:
        log.warning("%s: no published SHA-256 to check against; computed %s (not verified)", filename, digest)
    return record(dest, url, digest, expected is not None)


def _offline_hint(entry: RegistryModel | None, spec: str) -> str:
    """What to do when the download host cannot be reached from this machine."""
    lines = ["Without access to that host:"]
    if entry is not None:
        endpoint = os.environ.get("HF_ENDPOINT")
        lines.append(f"  - set HF_ENDPOINT to a Hugging Face mirror you can reach (now: {endpoint or 'not set'})")
    if entry is not None and entry.kind == "checkpoint":
        lines.append(f"  - download the {entry.repo} checkpoint on another machine, copy the folder here, run "
                     f"`edgebit convert FOLDER {entry.name}.gguf`, then `edgebit models import {entry.name}.gguf "
                     f"--name {entry.name}`")
    else:
        url = entry.url() if entry else spec
        name = f" --name {entry.name}" if entry else " [--sha256 DIGEST]"
        lines.append(f"  - download {url} on another machine, copy it here and run "
                     f"`edgebit models import FILE{name}` (the size and SHA-256 are checked when known)")
    lines.append("  - or pull from a URL you can reach: `edgebit pull URL [--sha256 DIGEST]`")
    return "\n".join(lines)


def _pull_checkpoint(entry: RegistryModel, dest: Path, progress: Progress | None,
                     convert_progress: Callable[[int, int], None] | None, retries: int) -> StoredModel:
    """Fetch a safetensors checkpoint into the cache, convert it to I2_S in the store, drop the cache."""
    from .convert import ConvertError, convert

    folder = cache_dir() / "checkpoints" / entry.repo.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(filename: str, optional: bool) -> bool:
        if (folder / filename).is_file():
            return True
        try:
            download(entry.url(filename), folder / filename, progress=progress, retries=retries)
        except StoreError as exc:
            if optional and "HTTP 404" in str(exc):
                return False
            raise
        return True

    fetch("config.json", optional=False)
    for filename in CHECKPOINT_FILES[1:]:
        fetch(filename, optional=True)
    if not fetch("model.safetensors", optional=True):
        fetch("model.safetensors.index.json", optional=False)
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise StoreError(f"{entry.repo}: unusable model.safetensors.index.json ({exc})") from None
        for shard in shards:
            if not SAFE_NAME.match(shard):
                raise StoreError(f"{entry.repo}: index names an unsafe file {shard!r}")
            fetch(shard, optional=False)
    log.warning("%s: no published digests; the checkpoint is not verified", entry.name)
    try:
        convert(folder, dest, name=entry.name, progress=convert_progress)
    except ConvertError as exc:
        raise StoreError(f"{entry.name}: conversion failed: {exc} (the download stays in {folder})") from None
    stored = record(dest, entry.url("config.json").rsplit("/resolve/", 1)[0])
    shutil.rmtree(folder, ignore_errors=True)
    return stored
