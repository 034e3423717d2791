"""download.py against a local HTTP server: checksums, resume with a Range request, fast failure offline."""
import hashlib
import http.server
import os
import socket
import threading
import time

import pytest

import download
from conftest import SQUAD_V1, STORIES
from errors import UserError


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.content` at any path, honouring `Range: bytes=N-`; logs each request's headers."""

    def do_GET(self):
        self.server.requests.append(dict(self.headers))
        content = self.server.content
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in self.headers else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        self.wfile.write(content[start:])
        self.server.sent += len(content) - start

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.content, httpd.requests, httpd.sent = b"", [], 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(httpd, name="file.json"):
    return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"


def blob_sha1(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]     # nothing listens once the socket is closed


def test_download_checks_the_git_blob_sha1(server, tmp_path):
    server.content = os.urandom(300_000)
    path = str(tmp_path / "data.json")
    download.download(url(server), path, blob_sha1=blob_sha1(server.content),
                      sha256=hashlib.sha256(server.content).hexdigest())
    assert open(path, "rb").read() == server.content and not os.path.exists(path + ".part")


def test_a_corrupt_download_is_an_error_naming_it_and_is_not_kept(server, tmp_path):
    server.content = b'{"version": "1.1", "data": []}'
    expected = blob_sha1(b'{"version": "1.1", "data": [1]}')
    path = str(tmp_path / "data.json")
    with pytest.raises(UserError, match=r"file.json: the downloaded file is corrupt \(git blob SHA-1"):
        download.download(url(server), path, blob_sha1=expected)
    assert os.listdir(tmp_path) == []


def test_a_partial_download_resumes_with_only_the_missing_bytes(server, tmp_path):
    server.content = os.urandom(250_000)
    path = str(tmp_path / "data.json")
    with open(path + ".part", "wb") as f:
        f.write(server.content[:100_000])      # what an interrupted run left
    download.download(url(server), path, blob_sha1=blob_sha1(server.content))
    assert [r.get("Range") for r in server.requests] == ["bytes=100000-"] and server.sent == 150_000
    assert open(path, "rb").read() == server.content


def test_squad_by_name_downloads_the_official_file_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(download, "SQUAD_URL", url(server, "{}"))
    server.content = open(SQUAD_V1, "rb").read()      # byte-identical to the official dev-v1.1.json
    path = download.resolve_data("squad1", split="dev")
    assert path == str(tmp_path / "squad" / "dev-v1.1.json") and open(path, "rb").read() == server.content
    assert download.resolve_data("squad1", split="dev") == path and len(server.requests) == 1   # cached
    server.content = server.content[:-1] + b" "        # a server handing out altered data is refused
    with pytest.raises(UserError, match="dev-v2.0.json: the downloaded file is corrupt"):
        download.resolve_data("squad2", split="dev")


def test_no_network_fails_fast_with_one_line_saying_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(download, "SQUAD_URL", f"http://127.0.0.1:{closed_port()}/{{}}")
    start = time.time()
    with pytest.raises(UserError, match=r"cannot reach .*pass the local file as --data FILE") as err:
        download.resolve_data("squad2")
    assert "\n" not in str(err.value) and time.time() - start < download.CONNECT_TIMEOUT
    pytest.importorskip("huggingface_hub")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match=r"--model HuggingFaceTB/SmolLM2-135M-Instruct: cannot reach .* DIR$"):
        download.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.time() - start < 2 * download.CONNECT_TIMEOUT


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_hub_download_says_how_to_log_in(server, tmp_path, monkeypatch, status):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url(server, "").rstrip("/"))
    monkeypatch.setattr(Handler, "do_GET", lambda self: (self.send_response(status), self.end_headers()))
    with pytest.raises(UserError, match=rf"Hub refused it \(HTTP {status}\).*HF_TOKEN or `hf auth login`"):
        download.resolve_model("meta-llama/Llama-3.1-8B-Instruct")


def test_local_paths_are_used_as_they_are_and_unknown_names_are_errors():
    assert download.resolve_model(STORIES) == STORIES and download.resolve_data(SQUAD_V1) == SQUAD_V1
    with pytest.raises(UserError, match="--data squad3: no such file"):
        download.resolve_data("squad3")
    with pytest.raises(UserError, match=r"--model ./missing: no such directory"):
        download.resolve_model("./missing")


def test_defaults_fill_only_what_the_user_left_empty():
    import train
    cpu = train.defaults_for(train.TrainConfig(), "cpu")
    assert (cpu.data, cpu.quantize, cpu.batch_size, cpu.max_seq_len, cpu.limit, cpu.grad_checkpointing) == \
        ("squad2", "nf4", 8, 256, 1000, False)
    assert cpu.model in (train.LOCAL_CPU_MODEL, train.CPU_MODEL)
    gpu = train.defaults_for(train.TrainConfig(), "cuda")
    assert (gpu.model, gpu.batch_size, gpu.max_seq_len, gpu.limit, gpu.grad_checkpointing) == \
        (train.GPU_MODEL, 4, 512, 0, True)
    mine = train.defaults_for(train.parse_args(["--limit", "0", "--no-grad-checkpointing", "--batch-size", "2",
                                                "--model", STORIES, "--data", SQUAD_V1]), "cuda")
    assert (mine.model, mine.data, mine.limit, mine.grad_checkpointing, mine.batch_size) == \
        (STORIES, SQUAD_V1, 0, False, 2)
    assert train.defaults_for(train.TrainConfig(), "mps").quantize == "none"


def test_train_with_no_arguments_offline_fails_fast_saying_how_to_pass_a_file(tmp_path, monkeypatch):
    import train
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "SQUAD_URL", f"http://127.0.0.1:{closed_port()}/{{}}")
    monkeypatch.setattr(train, "LOCAL_CPU_MODEL", STORIES)       # the CPU default's local copy, small here
    start = time.time()
    with pytest.raises(UserError, match="train-v2.0.json; with no network, .* --data FILE"):
        train.train(train.parse_args(["--device", "cpu", "--out", str(tmp_path / "run")]))
    assert time.time() - start < download.CONNECT_TIMEOUT and not (tmp_path / "run").exists()
