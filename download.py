"""Models and data on first use: a local path is used as it is; a SQuAD name (squad1, squad2) or a Hugging
Face model id (owner/name) is downloaded once into the cache, $QLORA_CACHE or ~/.cache/qlora-from-scratch.

SQuAD files come over plain HTTP, resumable (a Range request continues a `.part` file) and checked against
the official git blob SHA-1s; models come through `huggingface_hub.snapshot_download`, which resumes and
verifies by itself.
"""
import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

from errors import UserError

CONNECT_TIMEOUT = 5     # seconds: with no network, fail at once instead of hanging
READ_TIMEOUT = 60
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{}"
SQUAD_NAMES = {"squad1": "v1.1", "squad2": "v2.0"}
# Official git blob SHA-1s (the tree of rajpurkar/SQuAD-explorer, dataset/) and the dev files' sha256.
SQUAD_CHECKSUMS = {
    "train-v1.1.json": ("77f1d9a7daee11f7bc293832020f7709f63410ad", None),
    "dev-v1.1.json": ("e9a3f913ad1468ebe105b891334ca7b0bc0e2510",
                      "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"),
    "train-v2.0.json": ("312f804dbf85888fdce3299eaa58d6ec3f0bb6b7", None),
    "dev-v2.0.json": ("c6fa1a89a12c90b7fbfa8f6fb437cfff27af41ca",
                      "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8"),
}
# What a model directory needs; "model*.safetensors" skips duplicate formats some repos also ship
# (Mistral's consolidated.safetensors, Llama's original/*.pth).
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "model*.safetensors", "model.safetensors.index.json"]
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


def cache_dir():
    return os.environ.get("QLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora-from-scratch")


def resolve_data(name, split="train", option="--data"):
    """A local file for `name`: the path itself, or the official SQuAD `split` file of "squad1" / "squad2"."""
    if os.path.exists(name):
        return name
    if name not in SQUAD_NAMES:
        raise UserError(f"{option} {name}: no such file (squad1 / squad2 download the official SQuAD files)")
    filename = f"{split}-{SQUAD_NAMES[name]}.json"
    path = os.path.join(cache_dir(), "squad", filename)
    if not os.path.exists(path):
        blob_sha1, sha256 = SQUAD_CHECKSUMS[filename]
        download(SQUAD_URL.format(filename), path, blob_sha1=blob_sha1, sha256=sha256, option=option)
    return path


def _reachable(url):
    """Whether a TCP connection to the URL's host opens within CONNECT_TIMEOUT seconds."""
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=CONNECT_TIMEOUT).close()
        return True
    except OSError:
        return False


def download(url, path, *, blob_sha1=None, sha256=None, option="--data"):
    """Fetch `url` to `path` with a progress bar, continuing an earlier `path.part`, then check it."""
    host = urllib.parse.urlsplit(url).netloc
    if not _reachable(url):
        raise UserError(f"{option}: cannot reach {host} to download {url}; with no network, download it "
                        f"elsewhere and pass the local file as {option} FILE")
    from tqdm import tqdm
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as response:
            if response.status != 206:
                have = 0                     # the server ignored the Range: start again
            size = response.headers.get("Content-Length")
            total = have + int(size) if size else None
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if err.code != 416:                  # 416: nothing left to send, the .part file is complete
            raise UserError(f"{option}: {url}: HTTP {err.code} {err.reason}") from None
    except OSError as err:                   # the connection dropped: the .part file keeps what arrived
        raise UserError(f"{option}: downloading {url} stopped ({err}); run again to resume") from None
    problem = checksum_problem(part, blob_sha1, sha256)
    if problem:
        os.remove(part)
        raise UserError(f"{option}: {url}: the downloaded file is corrupt ({problem}); it was deleted, run again")
    os.replace(part, path)


def checksum_problem(path, blob_sha1=None, sha256=None):
    """None if `path` matches the checksums given, else which one differs. A git blob SHA-1 is the
    SHA-1 of b"blob <size>\\0" + the bytes, what `git hash-object` prints."""
    blob, sha = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
            sha.update(chunk)
    if blob_sha1 and blob.hexdigest() != blob_sha1:
        return f"git blob SHA-1 {blob.hexdigest()}, expected {blob_sha1}"
    if sha256 and sha.hexdigest() != sha256:
        return f"sha256 {sha.hexdigest()}, expected {sha256}"
    return None


def resolve_model(name, config_only=False, option="--model"):
    """A local model directory for `name`: the directory itself, or a Hub id's snapshot in the cache
    (only its config.json with `config_only`, for planning memory without the weights)."""
    if os.path.isdir(name):
        return name
    if not HUB_ID.fullmatch(name):
        raise UserError(f"{option} {name}: no such directory (nor a Hugging Face id such as owner/name)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{option} {name}: downloading from the Hugging Face Hub needs `pip install "
                        "huggingface_hub`; or pass a local model directory") from None
    online = _reachable(constants.ENDPOINT)
    try:   # offline, a complete earlier download in the cache still serves
        return snapshot_download(name, cache_dir=os.path.join(cache_dir(), "hub"), local_files_only=not online,
                                 allow_patterns=["config.json"] if config_only else MODEL_FILES)
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        # snapshot_download wraps some HTTP errors (403, 5xx) in LocalEntryNotFoundError: look at the cause
        cause = err if isinstance(err, HfHubHTTPError) else err.__cause__
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status in (401, 403):    # the Hub answers 401 for a missing repo too, so as not to reveal private ones
            raise UserError(f"{option} {name}: not a local directory, and the Hugging Face Hub refused it (HTTP "
                            f"{status}): check the name; a gated model needs its licence accepted on its page and "
                            "your token (HF_TOKEN or `hf auth login`)") from None
        if status == 404:
            raise UserError(f"{option} {name}: not a local directory, nor a model on the Hugging Face Hub") from None
        if not online:
            raise UserError(f"{option} {name}: cannot reach {constants.ENDPOINT} to download it; with no network, pass "
                            f"a local model directory (config.json, *.safetensors, tokenizer) as {option} DIR") from None
        raise UserError(f"{option} {name}: download failed ({str(err).splitlines()[0]})") from None
