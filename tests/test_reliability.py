"""Reliability: bad input gets a one-line error and changes nothing on disk; a kill, Ctrl-C, a NaN loss
or a full disk loses no work, and resuming gives the adapter an uninterrupted run gives.

The CLIs run as `__main__` (runpy) inside this process, which saves ~4 s of imports per case; a few
run as real subprocesses too, to prove the process prints nothing but the one line on stderr.
"""
import contextlib
import functools
import io
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import train as T
from conftest import GPT2_TOKENIZER, LLAMA2_TOKENIZER, ROOT, SQUAD_V1, STORIES
from errors import UserError, write_atomic
from lora import apply_lora, save_adapter

# One thread here and in every subprocess: on this shared 2-core machine a second OpenMP thread
# spin-waits for a busy core, and a fixed thread count keeps CPU results bit-for-bit repeatable.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(autouse=True)
def one_thread():
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)      # train() installs its own Ctrl-C handler


def cli(script, *argv):
    """(exit status, stdout, stderr) of `python script argv`, run as __main__ in this process."""
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


def subprocess_cli(script, *argv):
    run = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    return run.returncode, run.stdout, run.stderr


def assert_one_line_error(result, *fragments):
    """Exit status 2 and exactly one line `error: ...` on stderr that contains every fragment."""
    code, _, err = result
    assert code == 2, err[-3000:]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)
    return err


def snapshot(directory):
    """{relative path: (bytes, mtime_ns)} of every file below `directory`."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


# ----------------------------------------------------------------------------- fixtures: small valid inputs

@functools.cache
def small_squad_text():
    with open(SQUAD_V1, encoding="utf-8") as f:
        dev = json.load(f)
    return json.dumps(dict(dev, data=[dict(a, paragraphs=a["paragraphs"][:3]) for a in dev["data"][:4]]))


def squad_dict():
    """A small valid SQuAD v1.1 file: the first three paragraphs of the first four dev articles."""
    return json.loads(small_squad_text())


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small-v1.1.json"
    path.write_text(json.dumps(squad_dict()))
    return str(path)


@pytest.fixture
def earlier_run(tmp_path):
    """An --out directory holding an earlier run's files (contents only need to be recognisable)."""
    out = tmp_path / "run"
    for name in ("run.json", "metrics.jsonl", "checkpoint.pt", "best/adapter_model.safetensors",
                 "final/adapter_config.json", "final/adapter_model.safetensors", "predictions.json",
                 "metrics.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"earlier run: {name}")
    return out


def model_dir(tmp_path, name="model"):
    """A writable copy of stories260K."""
    d = tmp_path / name
    shutil.copytree(STORIES, d)
    return d


TRAIN_FAST = ["--max-seq-len", "192", "--batch-size", "2", "--grad-accum", "2", "--limit", "12",
              "--val-max", "2", "--max-steps", "2", "--dtype", "float32"]


def train_cli(model, data, out, *extra):
    return cli("train.py", "--model", model, "--data", data, "--out", out, *TRAIN_FAST, *extra)


# ----------------------------------------------------------------------------- bad data

def squad_with(edit):
    data = squad_dict()
    edit(data, data["data"][0]["paragraphs"][0]["qas"][0])
    return json.dumps(data).encode()


def set_answer_start(qa, delta):
    qa["answers"][0]["answer_start"] += delta


BAD_DATA = [  # (file name, its bytes, what the message must say)
    ("garbled.json", b'{"version": "1.1", "data": [{"title": ', "not valid JSON"),
    ("structure.json", json.dumps({"version": "1.1", "articles": []}).encode(), "wrong structure"),
    ("list.json", b"[1, 2]", "record 0: expected a JSON object"),
    ("version.json", squad_with(lambda d, qa: d.update(version="3.0")), "unknown SQuAD version '3.0'"),
    ("no-data.json", squad_with(lambda d, qa: d.update(data={"x": 1})), "'data' should be of type list"),
    ("no-question.json", squad_with(lambda d, qa: qa.pop("question")), "qas[0]: missing field 'question'"),
    ("no-answers.json", squad_with(lambda d, qa: qa.pop("answers")), "qas[0]: missing field 'answers'"),
    ("no-context.json", squad_with(lambda d, qa: d["data"][0]["paragraphs"][0].pop("context")),
     "paragraphs[0]: missing field 'context'"),
    ("start.json", squad_with(lambda d, qa: set_answer_start(qa, 1)), "answer_start 178 does not match"),
    ("start-type.json", squad_with(lambda d, qa: qa["answers"][0].update(answer_start="177")),
     "'answer_start' should be of type int"),
    ("empty-context.json", squad_with(lambda d, qa: d["data"][0]["paragraphs"][0].update(context=" \n")),
     "paragraphs[0]: empty context"),
    ("empty-question.json", squad_with(lambda d, qa: qa.update(question="  ")), "empty question"),
    ("v2-no-flag.json", squad_with(lambda d, qa: d.update(version="v2.0")), "missing field 'is_impossible'"),
    ("latin1.json", squad_with(lambda d, qa: None).replace(b"Super Bowl", b"S\xfcper Bowl", 1),
     "line 1: not UTF-8 text"),
    ("empty.json", b"", "not valid JSON"),
    ("bad-line.jsonl", b'{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": "a2"\n',
     "line 3: not valid JSON"),
    ("not-object.jsonl", b'{"question": "q1", "answer": "a1"}\n["q2", "a2"]\n', "line 2: expected a JSON object"),
    ("no-answer.jsonl", b'{"question": "q1", "answer": "a1"}\n{"question": "q2"}\n', "line 2: needs a non-empty"),
    ("latin1.jsonl", b'{"question": "q1", "answer": "a1"}\n{"question": "caf\xe9", "answer": "a"}\n',
     "line 2: not UTF-8 text"),
    ("dup.jsonl", b'{"id": "x", "question": "q1", "answer": "a1"}\n{"id": "x", "question": "q2", "answer": "a"}\n',
     "duplicate id 'x'"),
]


def no_model_load(monkeypatch):
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("name,content,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_error_and_the_earlier_run_is_untouched(monkeypatch, tmp_path, earlier_run,
                                                                     name, content, message):
    no_model_load(monkeypatch)
    path = tmp_path / name
    path.write_bytes(content)
    before = snapshot(earlier_run)
    # --overwrite is the riskiest flag: it must not delete anything until the input has proved good.
    assert_one_line_error(train_cli(STORIES, path, earlier_run, "--overwrite"), path, message)
    assert snapshot(earlier_run) == before


def test_real_processes_print_one_line_only(tmp_path):
    """The processes, imports included (bitsandbytes prints warnings on some machines), write one line."""
    path = tmp_path / "start.json"
    path.write_bytes(squad_with(lambda d, qa: set_answer_start(qa, 1)))
    result = subprocess_cli("train.py", "--model", STORIES, "--data", path, "--out", tmp_path / "out")
    assert_one_line_error(result, path, "answer_start 178 does not match the answer 'Denver Broncos'")
    assert result[1] == "" and not os.path.exists(tmp_path / "out")
    (tmp_path / "adapter").mkdir()
    result = subprocess_cli("evaluate.py", "--model", STORIES, "--adapter", tmp_path / "adapter", "--data", path)
    assert_one_line_error(result, "--adapter", tmp_path / "adapter" / "adapter_config.json", "no such file")


# ----------------------------------------------------------------------------- bad models and tokenizers

def split_into_shards(d):
    """Rewrite model.safetensors as two shards and an index, like a large Hub checkpoint."""
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.remove(d / "model.safetensors")


def edit_config(d, drop=(), **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg = {k: v for k, v in dict(cfg, **changes).items() if k not in drop}
    (d / "config.json").write_text(json.dumps(cfg))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def drop_tensor(d, name):
    tensors = load_file(d / "model.safetensors")
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def gpt2_tokenizer_instead(d):
    os.remove(d / "tokenizer.model")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(GPT2_TOKENIZER, f), d / f)


BAD_MODELS = [  # (case, edit of a stories260K copy, file named in the message, what the message says)
    ("no-config", lambda d: os.remove(d / "config.json"), "config.json", "not found"),
    ("config-not-json", lambda d: (d / "config.json").write_text("{"), "config.json", "not valid JSON"),
    ("no-weights", lambda d: os.remove(d / "model.safetensors"), "", "no model.safetensors"),
    ("truncated", lambda d: truncate(d / "model.safetensors"), "model.safetensors", "unreadable safetensors"),
    ("header-only", lambda d: truncate(d / "model.safetensors", 0.001), "model.safetensors", "unreadable"),
    ("missing-shard", lambda d: (split_into_shards(d), os.remove(d / "model-00002-of-00002.safetensors")),
     "model-00002-of-00002.safetensors", "missing"),
    ("bad-index", lambda d: (split_into_shards(d), truncate(d / "model.safetensors.index.json")),
     "model.safetensors.index.json", "not a valid safetensors index"),
    ("shape", lambda d: edit_config(d, intermediate_size=80), "model.safetensors",
     "has shape (64, 172), the config expects (64, 80)"),
    ("layers", lambda d: edit_config(d, num_hidden_layers=4), "model.safetensors", "unexpected tensor"),
    ("lacks-tensor", lambda d: drop_tensor(d, "model.layers.3.mlp.up_proj.weight"), "",
     "lacks 1 tensors, e.g. ['model.layers.3.mlp.up_proj.weight']"),
    ("architecture", lambda d: edit_config(d, model_type="bert"), "config.json", "unsupported architecture 'bert'"),
    ("missing-field", lambda d: edit_config(d, drop=["hidden_size"]), "config.json", "missing field 'hidden_size'"),
    ("llama2-tokenizer", lambda d: shutil.copy(os.path.join(LLAMA2_TOKENIZER, "tokenizer.model"), d),
     "", "32000 tokens but the model's vocab_size is 512"),
    ("gpt2-tokenizer", gpt2_tokenizer_instead, "", "50257 tokens but the model's vocab_size is 512"),
]


@pytest.mark.parametrize("case,edit,file,message", BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_bad_model_is_one_line_error_and_the_earlier_run_is_untouched(tmp_path, squad_file, earlier_run,
                                                                      case, edit, file, message):
    d = model_dir(tmp_path)
    edit(d)
    before = snapshot(earlier_run)
    assert_one_line_error(train_cli(d, squad_file, earlier_run, "--overwrite"), d / file, message)
    assert snapshot(earlier_run) == before


# ----------------------------------------------------------------------------- pickle checkpoints

class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious pytorch_model.bin could do with any function."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def bin_model_dir(tmp_path, name, extra=None):
    """stories260K with its weights as a pytorch_model.bin (a pickle) instead of safetensors."""
    d = model_dir(tmp_path, name)
    tensors = load_file(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    torch.save(dict(tensors, **(extra or {})), d / "pytorch_model.bin")
    return d


def test_pickle_that_would_run_code_is_refused(tmp_path, squad_file, earlier_run):
    marker = tmp_path / "code-ran"
    d = bin_model_dir(tmp_path, "evil", {"model.norm.weight": RunsCode(marker)})
    before = snapshot(earlier_run)
    assert_one_line_error(train_cli(d, squad_file, earlier_run, "--overwrite"), d / "pytorch_model.bin",
                          "refused", "posix.mkdir")
    assert not marker.exists() and snapshot(earlier_run) == before
    torch.load(d / "pytorch_model.bin", weights_only=False)      # the payload is real: a plain load runs it
    assert marker.exists()


def test_plain_pickle_state_dict_loads_with_a_warning(tmp_path):
    d = bin_model_dir(tmp_path, "plain")
    with pytest.warns(UserWarning, match="pytorch_model.bin: a pickle checkpoint; loading with weights_only=True"):
        ours = M.load_model(str(d))
    reference = M.load_model(STORIES)
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    torch.testing.assert_close(ours(ids), reference(ids), rtol=0, atol=0)
    truncate(d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: unreadable pickle checkpoint"):
        M.load_model(str(d))


# ----------------------------------------------------------------------------- bad adapters (evaluate.py)

def make_adapter(directory, base=STORIES):
    """A PEFT adapter (r=16 on every linear) for `base`, as train.py writes it."""
    torch.manual_seed(0)
    model = M.load_model(str(base))
    apply_lora(model, 16, 32.0, 0.0, "all-linear")
    save_adapter(model, str(directory), base_model_path=str(base))
    return directory


def edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A random Llama with stories260K's tokenizer but a different width: an adapter's shapes cannot fit."""
    d = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(STORIES, d)
    edit_config(d, hidden_size=32, head_dim=4)
    torch.manual_seed(0)
    model = M.Transformer(M.Config.from_hf(str(d)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("model.")},
              d / "model.safetensors", metadata={"format": "pt"})
    return d


BAD_ADAPTERS = [  # (case, edit of a fresh stories260K adapter directory, what the message says)
    ("empty", lambda a: [os.remove(a / f) for f in os.listdir(a)], "adapter_config.json: no such file"),
    ("no-weights", lambda a: os.remove(a / "adapter_model.safetensors"), "no adapter_model.safetensors in"),
    ("config-not-json", lambda a: (a / "adapter_config.json").write_text("{"), "cannot read the adapter in"),
    ("truncated", lambda a: truncate(a / "adapter_model.safetensors"), "cannot read the adapter in"),
    ("rank", lambda a: edit_json(a / "adapter_config.json", r=8), "has shape (16, 64), model expects (8, 64)"),
    ("targets", lambda a: edit_json(a / "adapter_config.json", target_modules=["q_proj", "v_proj"]),
     "0 missing and 50 unexpected keys"),
    ("no-such-target", lambda a: edit_json(a / "adapter_config.json", target_modules=["c_attn"]),
     "LoRA targets ['c_attn'] match no linear layer"),
    ("not-lora", lambda a: edit_json(a / "adapter_config.json", peft_type="PREFIX_TUNING"), "not 'LORA'"),
    ("config-list", lambda a: (a / "adapter_config.json").write_text("[]"), "not an adapter config"),
    ("no-rank", lambda a: edit_json(a / "adapter_config.json", r=None), "a LoRA config needs r and target_modules"),
]


@pytest.mark.parametrize("case,edit,message", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_is_one_line_error_and_earlier_results_are_untouched(tmp_path, squad_file, earlier_run,
                                                                         case, edit, message):
    adapter = make_adapter(tmp_path / "adapter")
    edit(adapter)
    before = snapshot(earlier_run)
    result = cli("evaluate.py", "--model", STORIES, "--adapter", adapter, "--data", squad_file, "--limit", 2,
                 "--max-new-tokens", 4, "--out", earlier_run, "--overwrite")
    assert_one_line_error(result, adapter, message)
    assert snapshot(earlier_run) == before


def test_adapter_of_another_base_model_is_refused(tmp_path, squad_file, other_base, earlier_run):
    adapter = make_adapter(tmp_path / "adapter", base=other_base)
    before = snapshot(earlier_run)
    result = cli("evaluate.py", "--model", STORIES, "--adapter", adapter, "--data", squad_file, "--limit", 2,
                 "--out", earlier_run, "--overwrite")
    assert_one_line_error(result, adapter / "adapter_model.safetensors", "model expects (16, 64)",
                          f"trained on {other_base}")
    assert snapshot(earlier_run) == before


# ----------------------------------------------------------------------------- options that cannot work

BAD_OPTIONS = [  # (extra options, what the message says); TRAIN_FAST's values come first, so these win
    (["--max-seq-len", "-1"], "--max-seq-len must be > 0, got -1"),            # 0 means the device's default
    (["--max-seq-len", "4096"], "--max-seq-len 4096 is beyond the model's 512 positions"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr=-1e-4"], "--lr must be > 0, got -0.0001"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--rank", "0"], "--rank must be > 0"),
    (["--grad-accum", "0"], "--batch-size and --grad-accum must be > 0"),
    (["--max-steps", "0", "--epochs", "0"], "give --max-steps > 0 or --epochs > 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--val-max", "-5"], "--val-max must be >= 0, got -5"),
    (["--unanswerable-share", "1.5"], "--unanswerable-share must be in [0, 1]"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--quantize", "int8"], "--quantize 'int8': use nf4, fp4 or none"),
    (["--dtype", "float64"], "--dtype 'float64': use auto, float32 or bfloat16"),
    (["--format", "alpaca"], "--format 'alpaca'"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "mps"], "--device mps: MPS is not available"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--resume"], "--resume: no checkpoint.pt in"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="expects a CPU-only machine")
@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_impossible_options_are_refused_before_anything_loads(monkeypatch, tmp_path, squad_file, extra, message):
    import data
    import tokenizer
    no_model_load(monkeypatch)
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
    monkeypatch.setattr(data, "load_examples", lambda *a: pytest.fail("the data was loaded"))
    t0 = time.perf_counter()
    result = train_cli(STORIES, squad_file, tmp_path / "out", *extra)
    assert time.perf_counter() - t0 < 1.0
    assert_one_line_error(result, message)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("extra,message", [(["--targets", "lm_head"], "LoRA on lm_head is not supported"),
                                           (["--unanswerable-share", "0.3"], "needs SQuAD v2.0 data")])
def test_options_the_model_or_data_cannot_take_are_refused(tmp_path, squad_file, extra, message):
    assert_one_line_error(train_cli(STORIES, squad_file, tmp_path / "out", *extra), message)
    assert not os.path.exists(tmp_path / "out/checkpoint.pt")


def test_out_that_is_a_file_or_an_earlier_run_is_refused(monkeypatch, tmp_path, squad_file, earlier_run):
    no_model_load(monkeypatch)
    (tmp_path / "file").write_text("mine")
    assert_one_line_error(train_cli(STORIES, squad_file, tmp_path / "file"), "is a file, not a directory")
    before = snapshot(earlier_run)
    assert_one_line_error(train_cli(STORIES, squad_file, earlier_run), earlier_run,
                          "holds an earlier run: pass --resume to continue it or --overwrite")
    assert snapshot(earlier_run) == before and (tmp_path / "file").read_text() == "mine"


# ----------------------------------------------------------------------------- interruption and resume

RUN = ["--max-seq-len", "192", "--batch-size", "2", "--grad-accum", "2", "--limit", "40", "--val-max", "3",
       "--eval-every", "3", "--log-every", "1", "--dropout", "0.1", "--lr", "1e-3", "--dtype", "float32",
       "--max-steps", "12"]
STEPS, EVERY, ACCUM = 12, 3, 2


class Killed(BaseException):
    """Stands for the process dying at this point (nothing catches a BaseException in train.py)."""


def train_in_process(data, out, *extra):
    """train.train() on RUN's settings; its stdout."""
    cfg = T.parse_args(["--model", STORIES, "--data", str(data), "--out", str(out), *RUN, *extra])
    with contextlib.redirect_stdout(io.StringIO()) as log:
        T.train(cfg)
    return log.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, squad_file):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(squad_file, out)
    torch.set_num_threads(threads)
    return out


def records(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def saved_checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_same_run(out, reference):
    """Identical adapters (best and final) and a log with every step once, with the reference's numbers."""
    for adapter in ("final", "best"):
        ours, theirs = (load_file(d / adapter / "adapter_model.safetensors") for d in (out, reference))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), adapter
    fields = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s" and k != "peak_mem_mb"}  # noqa: E731
    ours, theirs = [fields(r) for r in records(out)], [fields(r) for r in records(reference)]
    assert [r["step"] for r in ours if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in ours if "val_loss" in r] == list(range(0, STEPS + 1, EVERY))
    assert ours == theirs


def start(data, out, *extra):
    return subprocess.Popen([sys.executable, "train.py", "--model", STORIES, "--data", str(data), "--out", str(out),
                             *RUN, *extra], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def read_until(proc, prefix):
    """Read the run's stdout up to a line starting with `prefix`; False if it ended first."""
    return any(line.startswith(prefix) for line in proc.stdout)


def step_line(k):
    return f'{{"step": {k}, "loss"'


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_adapter(tmp_path, squad_file, reference):
    out, rng = tmp_path / "run", random.Random(7)
    # Killed before its first checkpoint, during a step-0 validation made long (~0.5 s) so that the
    # kill surely lands before it ends: nothing to resume.
    proc = start(squad_file, out, "--val-fraction", "0.5", "--val-max", "100")
    assert read_until(proc, "trainable params")                 # printed once run.json is written
    proc.kill()
    proc.wait()
    assert (out / "run.json").exists() and not (out / "checkpoint.pt").exists()
    assert_one_line_error(cli("train.py", "--model", STORIES, "--data", squad_file, "--out", out, *RUN, "--resume"),
                          f"--resume: no checkpoint.pt in {out}; the run stopped before its first checkpoint: "
                          "start it again with --overwrite")
    # Start again, and kill it three times at random points, each followed by --resume.
    flags = "--overwrite"
    for k in sorted(rng.sample(range(1, STEPS), 3)):
        proc = start(squad_file, out, flags)
        assert read_until(proc, step_line(k))
        time.sleep(rng.uniform(0, 0.3))          # somewhere inside the next step, validation or a save
        proc.kill()
        assert proc.wait() == -signal.SIGKILL     # it died mid-run, and left a whole checkpoint
        assert saved_checkpoint(out)["state"]["step"] <= k
        flags = "--resume"
    proc = start(squad_file, out, "--resume")
    proc.stdout.read()
    assert proc.wait() == 0
    assert_same_run(out, reference)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_to_the_same_adapter(tmp_path, squad_file, reference):
    out = tmp_path / "run"
    proc = start(squad_file, out)
    assert read_until(proc, step_line(4))
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait() == 130
    saved = saved_checkpoint(out)["state"]["step"]
    assert f"interrupted: checkpoint saved at step {saved} in {out}; --resume continues" in rest
    assert 4 <= saved < STEPS and not (out / "final").exists()
    proc = start(squad_file, out, "--resume")
    proc.stdout.read()
    assert proc.wait() == 0
    assert_same_run(out, reference)


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    """Write half a file, then die (SIGKILL) before the rename: the old checkpoint is still whole."""
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"step": 3}, path)
    before = open(path, "rb").read()
    pid = os.fork()
    if pid == 0:                                                     # the child dies mid-write
        write_atomic(path, lambda tmp: (open(tmp, "wb").write(before[:10]), os.kill(os.getpid(), signal.SIGKILL)))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    assert open(path, "rb").read() == before and torch.load(path, weights_only=True) == {"step": 3}


def kill_before_final_adapter(monkeypatch):
    """Make the run die after its last checkpoint, just before it writes final/."""
    real = T.save_adapter

    def dies_before_final(model, directory, **kw):
        if directory.endswith("final"):
            raise Killed
        real(model, directory, **kw)
    monkeypatch.setattr(T, "save_adapter", dies_before_final)


def test_a_kill_after_the_final_checkpoint_resumes_without_repeating_anything(monkeypatch, tmp_path, squad_file,
                                                                             reference):
    kill_before_final_adapter(monkeypatch)
    with pytest.raises(Killed):
        train_in_process(squad_file, tmp_path / "run")
    monkeypatch.undo()
    train_in_process(squad_file, tmp_path / "run", "--resume")
    assert_same_run(tmp_path / "run", reference)        # one val_loss at the last step, not two


def test_a_run_that_stopped_early_stays_stopped_on_resume(monkeypatch, tmp_path, squad_file):
    kill_before_final_adapter(monkeypatch)
    stop = ["--patience", "1", "--lr", "1e-30"]                # the validation loss never improves
    with pytest.raises(Killed):
        train_in_process(squad_file, tmp_path / "run", *stop)
    monkeypatch.undo()
    log = train_in_process(squad_file, tmp_path / "run", "--resume", *stop)
    assert "done: 3 steps" in log
    assert max(r["step"] for r in records(tmp_path / "run")) == EVERY


# ----------------------------------------------------------------------------- NaN / inf

def poison(monkeypatch, step, what):
    """Make the loss (what="loss") or only the gradient (what="grad") of optimizer step `step` NaN."""
    real, calls = T.masked_loss_sum, []

    def patched(model, input_ids, labels, chunk=1024):
        total, n = real(model, input_ids, labels, chunk)
        if torch.is_grad_enabled():                        # a training micro-batch, not validation
            calls.append(None)
            if len(calls) == step * ACCUM + 1:
                # sqrt(z^2) at z = 0 is 0 forward, but its backward is inf * 0 = NaN
                z = total - total.detach()
                total = total * float("nan") if what == "loss" else total + torch.sqrt(z * z)
        return total, n
    monkeypatch.setattr(T, "masked_loss_sum", patched)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nonfinite_step_stops_with_the_last_good_checkpoint_intact(monkeypatch, tmp_path, squad_file, reference,
                                                                   what):
    out = tmp_path / "run"
    # Step 8 is the one before a checkpoint: a NaN that reached the weights would be saved at step 9.
    poison(monkeypatch, 8, what)
    with pytest.raises(UserError, match=rf"step 8: loss .*, gradient norm nan; stopped. The last good checkpoint "
                                        rf"is {out}/checkpoint.pt \(--resume --skip-nonfinite"):
        train_in_process(squad_file, out)
    saved = saved_checkpoint(out)
    assert saved["state"]["step"] == 6 and all(t.isfinite().all() for t in saved["lora"].values())
    monkeypatch.undo()                                   # the fault was transient: resuming finishes the run
    train_in_process(squad_file, out, "--resume")
    assert_same_run(out, reference)


def test_skip_nonfinite_skips_the_bad_batch_and_finishes(monkeypatch, tmp_path, squad_file):
    out = tmp_path / "run"
    poison(monkeypatch, 4, "loss")
    log = train_in_process(squad_file, out, "--skip-nonfinite")
    assert "step 4: loss nan, gradient norm nan: batch skipped" in log and "done: 12 steps" in log
    log = records(out)
    assert [r["step"] for r in log if "skipped" in r] == [5]
    assert [r["step"] for r in log if "loss" in r] == [s for s in range(1, STEPS + 1) if s != 5]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in log if "loss" in r)  # no NaN
    for adapter in ("best", "final"):
        assert all(t.isfinite().all() for t in load_file(out / adapter / "adapter_model.safetensors").values())


def test_weights_that_overflow_stop_the_run_with_a_message(tmp_path, squad_file):
    """A base whose weights overflow: the step-0 validation loss is already NaN, the first step stops."""
    d = model_dir(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][:] = 3e38       # fp32 max is 3.4e38: inf after a sum
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    result = cli("train.py", "--model", d, "--data", squad_file, "--out", tmp_path / "run", *RUN, "--quantize", "none")
    assert_one_line_error(result, "step 0: loss nan, gradient norm nan; stopped")
    assert saved_checkpoint(tmp_path / "run")["state"]["step"] == 0


# ----------------------------------------------------------------------------- a full disk

@contextlib.contextmanager
def disk_full_after(nbytes):
    """Make every write past `nbytes` of a file fail, as on a full disk (RLIMIT_FSIZE; no root needed)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # fail the write (EFBIG) instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def fails_on_call(monkeypatch, name, n):
    """Let T.<name>'s n-th call hit a full disk."""
    real, calls = getattr(T, name), []

    def patched(*args, **kwargs):
        calls.append(None)
        if len(calls) != n:
            return real(*args, **kwargs)
        with disk_full_after(4096):
            return real(*args, **kwargs)
    monkeypatch.setattr(T, name, patched)


def temp_files(out):
    return [os.path.join(r, f) for r, _, names in os.walk(out) for f in names if ".tmp" in f]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(monkeypatch, tmp_path, squad_file, reference):
    out = tmp_path / "run"
    fails_on_call(monkeypatch, "save_checkpoint", 3)                 # the checkpoint of step 6
    with pytest.raises(UserError, match=rf"could not write {out}/checkpoint.pt \(.*MiB free there\); "
                                        "the previous file is intact"):
        train_in_process(squad_file, out)
    assert saved_checkpoint(out)["state"]["step"] == 3 and temp_files(out) == []
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                       # a full disk can cut a log line short too
    monkeypatch.undo()                                   # space freed: resume and finish
    train_in_process(squad_file, out, "--resume")
    assert_same_run(out, reference)


def test_full_disk_while_saving_an_adapter_keeps_the_previous_one(monkeypatch, tmp_path, squad_file):
    out, real, calls, before = tmp_path / "run", T.save_adapter, [], {}

    def fails_second_time(model, directory, **kwargs):                # best/ after its first improvement
        calls.append(directory)
        if len(calls) == 1:
            return real(model, directory, **kwargs)
        before.update(snapshot(directory))
        with disk_full_after(4096):
            return real(model, directory, **kwargs)
    monkeypatch.setattr(T, "save_adapter", fails_second_time)
    with pytest.raises(UserError, match=rf"could not write {out}/best/adapter_model.safetensors \(.*MiB free there\); "
                                        "the previous file is intact"):
        train_in_process(squad_file, out)
    assert before and snapshot(out / "best") == before and temp_files(out) == []


def test_overwrite_removes_the_earlier_runs_adapters_before_training(monkeypatch, tmp_path, squad_file, earlier_run):
    """A new run killed early must not leave the old final/ adapter looking like its own."""
    monkeypatch.setattr(T, "save_checkpoint", lambda *a: (_ for _ in ()).throw(Killed))   # dies at step 0
    with pytest.raises(Killed):
        train_in_process(squad_file, earlier_run, "--overwrite")
    assert not (earlier_run / "final" / "adapter_model.safetensors").exists()
    assert not (earlier_run / "checkpoint.pt").exists()
    assert [r["step"] for r in records(earlier_run)] == [0]         # the new run's step-0 validation only
