"""The model store and downloader, against a local HTTP server on 127.0.0.1 that honours Range
requests and can drop a connection mid-file once (like a flaky link)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import edgebit
import edgebit.bench
from edgebit import registry, store
from edgebit.config import cache_dir, config_path, models_dir

PAYLOAD = bytes(np.random.default_rng(5).integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8))


class FileServer:
    """Serves `files` (URL path → bytes) with Range support; `drop_once[path] = n` sends the full
    Content-Length but only n bytes on the first GET of that path, then closes the connection.
    `ignore_range` answers every request with the whole file (200). `requests` logs (path, Range)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = server.drop_once.pop(self.path, None)
                self.wfile.write(data[start:] if cut is None else data[start : start + cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def test_entry(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> registry.RegistryModel:
    """A registry entry served by the local server, with its real size and digest."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    base = registry.lookup("bitnet-b1.58-2b-4t")
    entry = replace(base, name="test-model", aliases=("tm",), repo="acme/test-gguf", filename="m.gguf",
                    size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(registry, "MODELS", registry.MODELS + (entry,))
    server.files["/acme/test-gguf/resolve/main/m.gguf"] = PAYLOAD
    return entry


def test_edgebit_home_moves_everything(home):
    assert models_dir() == home / "models" and cache_dir() == home / "cache"
    assert config_path() == home / "config.toml"


def test_registry_knows_the_2b4t_file():
    entry = registry.lookup("2B4T")
    assert entry is not None and entry.name == "bitnet-b1.58-2b-4t"
    assert entry.url() == "https://huggingface.co/microsoft/bitnet-b1.58-2B-4T-gguf/resolve/main/ggml-model-i2_s.gguf"
    assert entry.sha256 == "4221b252fdd5fd25e15847adfeb5ee88886506ba50b8a34548374492884c2162"
    for model in registry.MODELS:  # unknown digests stay None, never made up
        assert model.sha256 is None or len(model.sha256) == 64


def test_pull_registry_model_verifies_and_resolves(server, test_entry, home):
    stored = store.pull("tm")
    path = home / "models" / "test-model.gguf"
    assert stored.path == str(path) and path.read_bytes() == PAYLOAD
    assert stored.verified and stored.sha256 == test_entry.sha256
    assert store.resolve("test-model") == store.resolve("tm") == store.resolve("test-model.gguf") == str(path)
    assert [m.name for m in store.list_models()] == ["test-model"]
    assert store.pull("test-model").path == stored.path  # already there: no second download
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_range(server, test_entry, home):
    server.drop_once["/acme/test-gguf/resolve/main/m.gguf"] = 1_000_000
    with pytest.raises(store.StoreError, match="interrupted after 1000000 bytes"):
        store.pull("test-model", retries=0)
    part = home / "models" / "test-model.gguf.part"
    assert part.stat().st_size == 1_000_000
    with pytest.raises(store.StoreError, match="not downloaded yet"):  # a .part never resolves
        store.resolve("test-model")
    with pytest.raises(store.StoreError, match="incomplete download"):
        store.resolve(str(part))
    assert store.list_models() == []

    stored = store.pull("test-model", retries=0)
    assert server.requests[-1] == ("/acme/test-gguf/resolve/main/m.gguf", "bytes=1000000-")
    assert Path(stored.path).read_bytes() == PAYLOAD and stored.verified and not part.exists()


def test_retry_within_one_pull_resumes(server, test_entry):
    server.drop_once["/acme/test-gguf/resolve/main/m.gguf"] = 123_456
    stored = store.pull("test-model", retries=1)
    assert [r for _, r in server.requests] == [None, "bytes=123456-"]
    assert Path(stored.path).read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, test_entry, home):
    server.drop_once["/acme/test-gguf/resolve/main/m.gguf"] = 500_000
    with pytest.raises(store.StoreError):
        store.pull("test-model", retries=0)
    server.ignore_range = True
    stored = store.pull("test-model", retries=0)
    assert server.requests[-1][1] == "bytes=500000-"  # asked to resume, got the whole file
    assert Path(stored.path).read_bytes() == PAYLOAD


def test_corrupt_download_is_rejected_and_removed(server, test_entry, home):
    server.files["/acme/test-gguf/resolve/main/m.gguf"] = PAYLOAD[:-1] + b"\0"
    with pytest.raises(store.ChecksumError, match="does not match"):
        store.pull("test-model")
    assert list((home / "models").iterdir()) == []


def test_wrong_size_is_rejected(server, test_entry, home):
    server.files["/acme/test-gguf/resolve/main/m.gguf"] = PAYLOAD + b"x"
    with pytest.raises(store.ChecksumError, match="expected"):
        store.pull("test-model")
    assert list((home / "models").iterdir()) == []


def test_pull_url_without_digest_records_unverified_hash(server, home, caplog):
    server.files["/files/custom.gguf"] = PAYLOAD
    stored = store.pull(f"{server.url}/files/custom.gguf")
    assert stored.name == "custom" and not stored.verified
    assert stored.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert "not verified" in caplog.text
    sidecar = json.loads((home / "models" / "custom.gguf.json").read_text())
    assert sidecar["source"] == f"{server.url}/files/custom.gguf" and sidecar["verified"] is False


def test_pull_url_with_digest_and_name(server, home):
    server.files["/x/model.bin"] = PAYLOAD
    with pytest.raises(store.ChecksumError):
        store.pull(f"{server.url}/x/model.bin", name="mine", sha256="0" * 64)
    stored = store.pull(f"{server.url}/x/model.bin", name="mine", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert stored.path == str(home / "models" / "mine.gguf") and stored.verified


@pytest.mark.parametrize("spec, message", [
    ("no-such-model", "neither a known model name nor"),
    ("file:///etc/passwd", "neither a known model name nor"),
])
def test_pull_rejects_unknown_specs(spec, message):
    with pytest.raises(store.StoreError, match=message):
        store.pull(spec)


def test_http_errors_are_reported(server):
    with pytest.raises(store.StoreError, match="HTTP 404"):
        store.pull(f"{server.url}/missing.gguf")


def test_resolve_prefers_paths_and_rm_only_touches_the_store(server, tmp_path, home):
    outside = tmp_path / "test-model"
    outside.write_bytes(b"x")
    server.files["/m/test-model.gguf"] = PAYLOAD
    store.pull(f"{server.url}/m/test-model.gguf")
    assert store.resolve(str(outside)) == str(outside)
    assert store.resolve("test-model.gguf") == str(home / "models" / "test-model.gguf")
    removed = store.remove("test-model")
    assert removed.name == "test-model" and store.list_models() == []
    assert not (home / "models" / "test-model.gguf.json").exists() and outside.exists()
    with pytest.raises(store.StoreError, match="no model"):
        store.remove("test-model")
    with pytest.raises(store.StoreError, match="not a file, a known model name"):
        store.resolve("nothing-here")
    with pytest.raises(store.StoreError, match="no model"):
        store.remove("../../etc/passwd")


def test_pull_checkpoint_converts_into_the_store(server, home, monkeypatch, tmp_path):
    """A "checkpoint" entry (1bitLLM-style): files fetched from <endpoint>/<repo>/resolve/main/,
    converted to I2_S in the store; optional tokenizer files may 404."""
    from test_convert import _random_dir, write_byte_tokenizer

    src = _random_dir(tmp_path / "ckpt", 300)
    write_byte_tokenizer(src, 300)
    for f in src.iterdir():
        server.files[f"/acme/ckpt/resolve/main/{f.name}"] = f.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    entry = replace(registry.lookup("bitnet_b1_58-large"), name="tiny-ckpt", aliases=(), repo="acme/ckpt")
    monkeypatch.setattr(registry, "MODELS", registry.MODELS + (entry,))
    stored = store.pull("tiny-ckpt")
    assert stored.path == str(home / "models" / "tiny-ckpt.gguf") and not stored.verified
    requested = {p.rsplit("/", 1)[1] for p, _ in server.requests}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= requested
    assert not any((home / "cache").rglob("*.safetensors"))  # the checkpoint is dropped after conversion
    model = edgebit.load(store.resolve("tiny-ckpt"))
    assert model.info["arch"] == "bitnet-b1.58" and model.info["block_count"] == 1


def test_complete_part_file_is_finished_without_download(server, test_entry, home):
    """A .part that already holds the whole file (crash before the rename): the server answers 416."""
    (home / "models").mkdir(parents=True)
    (home / "models" / "test-model.gguf.part").write_bytes(PAYLOAD)
    stored = store.pull("test-model")
    assert server.requests == [("/acme/test-gguf/resolve/main/m.gguf", f"bytes={len(PAYLOAD)}-")]
    assert stored.verified and Path(stored.path).read_bytes() == PAYLOAD


# --- an unreachable host, importing a file, files dropped into the store by hand


def _closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_reported_at_once_with_what_to_do_offline(home, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/x/model.gguf"
    with pytest.raises(store.UnreachableError) as err:
        store.pull(url, retries=2)
    message = str(err.value)
    assert message.startswith(f"cannot reach {url.split('/')[2]}: Connection refused")
    assert "interrupted" not in message and "edgebit models import FILE" in message
    assert not any((home / "models").glob("*.part"))

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(store.UnreachableError) as err:
        store.pull("bitnet-b1.58-2b-4t")
    assert f"HF_ENDPOINT to a Hugging Face mirror you can reach (now: {endpoint})" in str(err.value)
    assert "edgebit models import FILE --name bitnet-b1.58-2b-4t" in str(err.value)
    with pytest.raises(store.UnreachableError) as err:  # a checkpoint: convert, then import under its name
        store.pull("bitnet_b1_58-large")
    assert "`edgebit models import bitnet_b1_58-large.gguf --name bitnet_b1_58-large`" in str(err.value)


def test_unreachable_host_during_a_resume_keeps_the_partial_file(server, test_entry, home, monkeypatch):
    server.drop_once["/acme/test-gguf/resolve/main/m.gguf"] = 1_000_000
    with pytest.raises(store.StoreError, match="interrupted"):
        store.pull("test-model", retries=0)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(store.UnreachableError, match="the 1000000 bytes downloaded so far stay in"):
        store.pull("test-model")
    assert (home / "models" / "test-model.gguf.part").stat().st_size == 1_000_000


def test_import_recognises_a_registry_model_by_its_digest_and_links_it(test_entry, home, tmp_path):
    src = tmp_path / "ggml-model-i2_s.gguf"
    src.write_bytes(PAYLOAD)
    stored, how = store.import_file(src)
    assert stored.name == "test-model" and stored.verified and stored.sha256 == test_entry.sha256
    assert how == "linked" and os.path.samefile(stored.path, src)  # tmp_path and the store share a file system
    assert store.resolve("tm") == stored.path
    with pytest.raises(store.StoreError, match="already in the store"):
        store.import_file(src, copy=True)
    assert sorted(p.name for p in (home / "models").iterdir()) == ["test-model.gguf", "test-model.gguf.json"]


def test_import_rejects_a_file_that_does_not_match_the_registry(test_entry, home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(PAYLOAD[:-1] + b"\0")
    with pytest.raises(store.ChecksumError,
                       match=f"{bad}: SHA-256 .* does not match the digest published for test-model"):
        store.import_file(bad, name="test-model")
    bad.write_bytes(PAYLOAD[:1000])
    with pytest.raises(store.ChecksumError, match="1000 bytes, but test-model has"):
        store.import_file(bad, name="tm", copy=True)
    with pytest.raises(store.ChecksumError, match="does not match the given digest"):
        store.import_file(bad, sha256="0" * 64)
    assert list((home / "models").iterdir()) == []
    assert bad.read_bytes() == PAYLOAD[:1000]  # the source is never touched


def test_import_of_an_unknown_file_copies_it_unverified(home, tmp_path):
    src = tmp_path / "custom.gguf"
    src.write_bytes(b"GGUF" + PAYLOAD[:100])
    stored, how = store.import_file(src, name="mine", copy=True)
    assert how == "copied" and stored.name == "mine" and not stored.verified
    assert not os.path.samefile(stored.path, src) and Path(stored.path).read_bytes() == src.read_bytes()
    assert stored.source == f"imported from {src.resolve()}"


def test_file_dropped_into_the_store_is_checked_once_then_trusted_until_it_changes(test_entry, home, monkeypatch):
    folder = home / "models"
    folder.mkdir(parents=True)
    dropped = folder / "test-model.gguf"
    dropped.write_bytes(PAYLOAD[:-1] + b"\0")
    with pytest.raises(store.StoreError, match="SHA-256 .*, expected .* \\(published for test-model\\)") as err:
        store.resolve("test-model")
    assert "edgebit models rm test-model" in str(err.value)
    with pytest.raises(store.StoreError, match="expected"):  # by path too
        store.resolve(str(dropped))
    dropped.write_bytes(PAYLOAD[:5])
    with pytest.raises(store.StoreError, match=rf"5 bytes, expected {len(PAYLOAD)} \(published for test-model\)"):
        store.resolve("test-model")

    dropped.write_bytes(PAYLOAD)
    assert store.resolve("test-model") == str(dropped)
    assert json.loads((folder / "test-model.gguf.json").read_text())["verified"] is True

    def no_hashing(*args: object) -> None:
        raise AssertionError("hashed again although the file did not change")

    with monkeypatch.context() as m:
        m.setattr(store, "_hash_file", no_hashing)
        assert store.resolve("test-model") == str(dropped)
    dropped.write_bytes(PAYLOAD[:-1] + b"\0")  # same size, new content and modification time
    os.utime(dropped, ns=(0, 0))
    with pytest.raises(store.StoreError, match="the file is damaged or a different model"):
        store.resolve("test-model")


def test_generated_models_are_listed_as_such_and_removable(home):
    path = edgebit.bench.random_model("tiny", seed=3)
    assert path == home / "models" / "random-tiny-seed3.gguf"
    [listed] = store.list_models()
    assert listed.name == "random-tiny-seed3" and listed.generated and "tiny" in listed.generated
    assert store.resolve("random-tiny-seed3") == str(path)
    store.remove("random-tiny-seed3")
    assert store.list_models() == [] and not path.exists()
