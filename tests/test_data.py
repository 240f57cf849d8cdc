"""Streaming data (issue 4): prepare -> MDS shards -> loader; ranks, resume, bad inputs."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tailkd_dist.data.corpus import is_validation, stdlib_files
from tailkd_dist.data.dataset import LoaderConfig, PackedTokenDataset, check_compat, make_loader
from tailkd_dist.data.prepare import main as prepare_main
from tailkd_dist.data.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def _streaming_lock_files(tmp_path_factory):
    # streaming leaves 0-byte filelock files in tempfile.gettempdir() (never removed); keep ours
    # in pytest's temporary tree instead of /tmp. (Its /dev/shm objects it removes itself.)
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tmpdir"))
    yield tempfile.tempdir
    tempfile.tempdir = saved


def _prepare(*argv: str) -> dict:
    assert prepare_main([*map(str, argv), "--no-progress"]) == 0
    out = Path(argv[argv.index("-o") + 1])
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def stdlib_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stdlib") / "out"
    # Small shards so the data spans several, --num-proc 2 to exercise the worker path.
    _prepare("python-stdlib", "-o", out, "--max-files", 12, "--seq-len", SEQ, "--val-fraction",
             0.25, "--train-tokenizer", 400, "--num-proc", 2, "--shard-size-limit", 16384)
    return out


@pytest.fixture(scope="module")
def jsonl_out(tmp_path_factory, stdlib_out) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("jsonl")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "γάμμα", "δ", "naïve", "print(x)", "\n", "  ", "0xFF", "{}"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(150)]
    docs[7] = ""  # empty documents are skipped
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "content": d}) + "\n")
    out = root / "out"
    # The HF-tokenizer-directory path: reuse the BPE trained for the stdlib data.
    _prepare(root / "docs.jsonl", "-o", out, "--text-column", "content", "--seq-len", SEQ,
             "--val-fraction", 0, "--tokenizer", stdlib_out / "tokenizer",
             "--shard-size-limit", 8192)
    return out, docs


def _expected_rows(tokens: np.ndarray, docs: np.ndarray) -> dict[str, list[int]]:
    """Reference sample from one raw row, by plain loops (independent of the loader's numpy)."""
    labels, positions = [], []
    for i in range(len(tokens) - 1):
        same = docs[i] == docs[i + 1] and docs[i] >= 0
        labels.append(int(tokens[i + 1]) if same else -100)
        positions.append(0 if i == 0 or docs[i] != docs[i - 1] else positions[-1] + 1)
    return {"input_ids": tokens[:-1].tolist(), "labels": labels,
            "doc_ids": docs[:-1].tolist(), "position_ids": positions}


def _check_readback(out: Path, split: str, texts: list[str]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer") if (out / "tokenizer").is_dir()
                                        else manifest["tokenizer"]["path"])
    eos, pad = tok.eos_token_id, manifest["tokenizer"]["pad_id"]
    want_tokens, want_docs = [], []
    for doc_id, text in enumerate(t for t in texts if t):  # empty documents are skipped
        ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
        want_tokens += ids
        want_docs += [doc_id] * len(ids)
    loader = make_loader(LoaderConfig(local=str(out), split=split, batch_size=4, shuffle=False,
                                      model_vocab_size=len(tok)))
    ds = loader.dataset
    rows = [ds.get_item(i) for i in range(ds.num_samples)]  # the raw MDS rows
    tokens = np.concatenate([r["tokens"] for r in rows])
    docs = np.concatenate([r["doc_ids"] for r in rows])
    n = len(want_tokens)
    assert tokens[:n].tolist() == want_tokens and docs[:n].tolist() == want_docs
    assert (docs[n:] == -1).all() and (tokens[n:] == pad).all() and len(tokens) - n <= SEQ
    stats = manifest["splits"][split]
    assert (stats["documents"], stats["tokens"], stats["rows"], stats["padding_tokens"]) == (
        want_docs[-1] + 1, n, len(rows), len(tokens) - n)
    # The loader's samples, in order (no shuffle, one rank), against the loop reference.
    seen = 0
    for batch in loader:
        for j, idx in enumerate(batch["sample_idx"].tolist()):
            assert idx == seen
            want = _expected_rows(rows[idx]["tokens"], rows[idx]["doc_ids"])
            for key, value in want.items():
                assert batch[key][j].tolist() == value, key
            seen += 1
        # EOS rule: the token before an EOS has it as target; the EOS position has none.
        inputs, labels = batch["input_ids"], batch["labels"]
        assert (labels[inputs == eos] == -100).all()
        assert (labels[:, :-1][inputs[:, 1:] == eos] == eos).all()
    assert seen == len(rows)
    del loader, ds


def test_stdlib_shards_read_back_exactly(stdlib_out):
    root = Path(sysconfig.get_paths()["stdlib"])
    _, files = stdlib_files(12)
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files
                   for part in Path(f).parts)
    manifest = json.loads((stdlib_out / "manifest.json").read_text())
    assert manifest["source"]["root"] == str(root) and manifest["seq_len"] == SEQ
    assert manifest["tokenizer"]["vocab_size"] <= 400 and manifest["splits"]["train"]["shards"] > 2
    for split, want_val in (("train", False), ("validation", True)):
        texts = [(root / f).read_text(encoding="utf-8") for f in files
                 if is_validation(f, 0.25) == want_val]
        assert texts
        _check_readback(stdlib_out, split, texts)


def test_jsonl_shards_read_back_exactly(jsonl_out, stdlib_out):
    out, docs = jsonl_out
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"]
    assert manifest["splits"]["train"]["skipped_empty"] == 1
    assert manifest["tokenizer"]["sha256"] == json.loads(
        (stdlib_out / "manifest.json").read_text())["tokenizer"]["sha256"]
    _check_readback(out, "train", docs)


# ---- ranks and resume (spawned processes) --------------------------------------------------------
def _run_epoch(config: dict, *, state: dict | None = None, stop_after: int | None = None) -> dict:
    """One epoch of sample_idx batches; the loader state after `stop_after` batches."""
    loader = make_loader(LoaderConfig(**config))
    if state is not None:
        loader.load_state_dict(state)
    batches, saved = [], None
    for batch in loader:
        batches.append(batch["sample_idx"].tolist())
        if len(batches) == stop_after:
            saved = loader.state_dict()
    del loader
    return {"batches": batches, "state": saved}


def _rank_main(rank: int, world: int, port: int, jobs: list[dict], result_file: str,
               tmpdir: str) -> None:
    tempfile.tempdir = tmpdir  # streaming's filelocks: shared by the ranks, out of /tmp
    # streaming assigns samples by these variables (torchrun sets them); gloo as in training.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    results = [_run_epoch(**job) for job in jobs]  # one after another, each its own local cache
    Path(result_file).write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def _launch(world: int, jobs: list[dict], tmp: Path) -> list[list[dict]]:
    """Run `jobs` in `world` fresh spawned processes (ranks); each rank's results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    files = [tmp / f"rank{r}-{os.urandom(4).hex()}.json" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, jobs, str(files[r]),
                                                  tempfile.gettempdir())) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    finally:
        for p in procs:  # a hung or failed rank must not outlive the test
            if p.is_alive():
                p.kill()
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_two_ranks_cover_epoch_and_resume(jsonl_out, tmp_path):
    out, _ = jsonl_out
    num_rows = json.loads((out / "manifest.json").read_text())["splits"]["train"]["rows"]
    # Shards served from a "remote" directory into a fresh local cache per run.
    base = dict(remote=str(out), split="train", batch_size=4, shuffle=True, seed=123)
    cfg = lambda name, **kw: {**base, "local": str(tmp_path / name), **kw}  # noqa: E731
    n = 3

    # 2 ranks (gloo, spawned), one epoch: disjoint and complete. When the row count is odd,
    # streaming repeats one row so that both ranks take the same number of steps.
    ranks = [r[0] for r in _launch(2, [dict(config=cfg("cache-2"), stop_after=n)], tmp_path)]
    samples = [i for r in ranks for b in r["batches"] for i in b]
    assert set(samples) == set(range(num_rows))
    assert len(samples) - len(set(samples)) == num_rows % 2
    two_rank_state = ranks[0]["state"]
    assert two_rank_state == ranks[1]["state"] and two_rank_state["sample_in_epoch"] == 2 * n * 4
    seen_by_two = {i for r in ranks for b in r["batches"][:n] for i in b}

    # 1 rank, uninterrupted (here; state saved after n batches). Then a new process resumes
    # from that state, and from the 2-rank state.
    full = _run_epoch(cfg("cache-full"), stop_after=n)
    assert sorted(i for b in full["batches"] for i in b) == list(range(num_rows))
    jobs = [dict(config=cfg("cache-resume", num_workers=1), state=full["state"]),
            dict(config=cfg("cache-2to1"), state=two_rank_state)]
    resumed, rest = _launch(1, jobs, tmp_path)[0]
    assert resumed["batches"] == full["batches"][n:]
    remaining = [i for b in rest["batches"] for i in b]
    assert len(remaining) == len(set(remaining))  # every remaining sample exactly once
    assert set(remaining) == set(range(num_rows)) - seen_by_two


# ---- bad inputs ----------------------------------------------------------------------------------
@pytest.fixture
def bad_inputs(tmp_path, stdlib_out):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nocol.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "garbage.jsonl").write_text("this is { not json\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "ok.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    return tmp_path, str(stdlib_out / "tokenizer")


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty: it holds no documents"),
    ("blank", "has no non-empty document"),
    ("missing-column", "has no column 'text' (columns: body): pass --text-column"),
    ("unreadable", "cannot read"),
    ("no-such-file", "matches no file"),
    ("not-empty-output", "is not empty: pass --overwrite"),
    ("overwrite-foreign", "is not an output of tailkd-prepare-data"),
    ("no-tokenizer-dir", "tokenizer directory"),
])
def test_prepare_bad_input(case, message, bad_inputs, capsys):
    tmp, tok = bad_inputs
    out = tmp / "out"
    argv = {
        "empty": [tmp / "empty.jsonl"],
        "blank": [tmp / "blank.jsonl"],
        "missing-column": [tmp / "nocol.jsonl"],
        "unreadable": [tmp / "garbage.jsonl"],
        "no-such-file": [tmp / "absent" / "*.jsonl"],
        "not-empty-output": [tmp / "ok.jsonl"],
        "overwrite-foreign": [tmp / "ok.jsonl", "--overwrite"],
        "no-tokenizer-dir": [tmp / "ok.jsonl"],
    }[case]
    if case in ("not-empty-output", "overwrite-foreign"):
        out = tmp / "full"
    tokenizer = str(tmp / "nope") if case == "no-tokenizer-dir" else tok
    code = prepare_main([*map(str, argv), "-o", str(out), "--tokenizer", tokenizer,
                         "--val-fraction", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("tailkd-prepare-data: error:") == 1, err
    assert not out.exists() or out == tmp / "full"
    assert (tmp / "full" / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name]  # no staging left behind


def test_overwrite_replaces_previous_output(bad_inputs):
    tmp, tok = bad_inputs
    args = ["-o", tmp / "o", "--tokenizer", tok, "--val-fraction", 0]
    first = _prepare(tmp / "ok.jsonl", *args)
    second = _prepare(tmp / "ok.jsonl", tmp / "ok.jsonl", *args, "--overwrite")
    assert (first["splits"]["train"]["documents"], second["splits"]["train"]["documents"]) == (1, 2)
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".o.")) == []


def test_output_never_replaces_or_nests_in_an_input(bad_inputs):
    """--overwrite replaces an earlier output only: never when an input lies inside it (the
    replace would delete the input), nor an output inside an input directory."""
    import hashlib

    tmp, tok = bad_inputs
    args = ["--tokenizer", tok, "--val-fraction", 0]
    _prepare(tmp / "ok.jsonl", "-o", tmp / "prev", *args)
    (tmp / "prev" / "mine.jsonl").write_text('{"text": "kept"}\n')

    def digest(d: Path) -> dict:
        return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in d.rglob("*") if f.is_file()}

    before = digest(tmp / "prev")
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "a.jsonl").write_text('{"text": "hello"}\n')
    for argv, message in (
        ([tmp / "prev" / "mine.jsonl", "-o", tmp / "prev", "--overwrite"], "contains the input"),
        ([tmp / "prev", "-o", tmp / "prev", "--overwrite"], "is the input"),
        ([tmp / "corpus", "-o", tmp / "corpus" / "shards"], "lies inside the input"),
    ):
        code = prepare_main([*map(str, argv), *map(str, args), "--no-progress"])
        assert code == 2, argv
    assert digest(tmp / "prev") == before
    assert sorted(p.name for p in (tmp / "corpus").iterdir()) == ["a.jsonl"]


def test_prepare_script_exit_status(tmp_path):
    # The command-line wrapper: one clear message on stderr and a non-zero exit status.
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"),
                           "python-stdlib", "-o", str(tmp_path / "o"), "--train-tokenizer", "300",
                           "--seq-len", "0"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "argument --seq-len: 0 must be at least 1" in proc.stderr


# ---- loader checks -------------------------------------------------------------------------------
def _copy(out: Path, tmp: Path) -> Path:
    dst = tmp / f"copy-{os.urandom(4).hex()}"
    shutil.copytree(out, dst)
    return dst


def test_loader_refuses_other_tokenizer_and_larger_vocab(jsonl_out, stdlib_out, tmp_path):
    out, _ = jsonl_out
    manifest = json.loads((out / "manifest.json").read_text())
    check_compat(manifest, tokenizer_dir=stdlib_out / "tokenizer", model_vocab_size=400)
    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer(["another corpus entirely"] * 20, vocab_size=300, out_dir=other)
    with pytest.raises(ValueError, match="were tokenised with .* Prepare the data again"):
        PackedTokenDataset(config=LoaderConfig(local=str(out), tokenizer_dir=str(other)))
    with pytest.raises(ValueError, match="sha256"):
        check_compat(manifest, tokenizer_sha256="0" * 64)
    vocab = manifest["tokenizer"]["vocab_size"]
    with pytest.raises(ValueError, match=f"has {vocab} ids but the model's vocabulary has 300"):
        PackedTokenDataset(config=LoaderConfig(local=str(out), model_vocab_size=300))


def test_loader_reports_bad_shards_by_name(jsonl_out, tmp_path):
    out, _ = jsonl_out
    shard = "shard.00001.mds"

    missing = _copy(out, tmp_path)
    (missing / "train" / shard).unlink()
    with pytest.raises(ValueError, match=f"shard .*{shard} is missing"):
        PackedTokenDataset(config=LoaderConfig(local=str(missing)))

    truncated = _copy(out, tmp_path)
    data = (truncated / "train" / shard).read_bytes()
    (truncated / "train" / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"shard .*{shard} is truncated"):
        PackedTokenDataset(config=LoaderConfig(local=str(truncated), local_check="size"))

    corrupt = _copy(out, tmp_path)
    flipped = bytearray(data)
    flipped[-10:] = bytes(b ^ 0xFF for b in flipped[-10:])  # same size, other bytes
    (corrupt / "train" / shard).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=f"shard .*{shard} fails its xxh64 check"):
        PackedTokenDataset(config=LoaderConfig(local=str(corrupt)))

    # From a remote, streaming's validate_hash catches it on download; the loader names it.
    loader = make_loader(LoaderConfig(remote=str(corrupt), local=str(tmp_path / "cache"),
                                      shuffle=False, batch_size=4))
    with pytest.raises(ValueError, match=f"shard .*{shard} cannot be read .*Checksum failure"):
        for _ in loader:
            pass
    del loader


def test_loader_refuses_missing_split_and_unprepared_dir(jsonl_out, tmp_path):
    out, _ = jsonl_out
    with pytest.raises(ValueError, match="has no split 'validation' \\(it has train\\)"):
        PackedTokenDataset(config=LoaderConfig(local=str(out), split="validation"))
    with pytest.raises(ValueError, match="manifest.json does not exist"):
        PackedTokenDataset(config=LoaderConfig(local=str(tmp_path)))
    empty = _copy(out, tmp_path)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["train"]["rows"] = 0
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is empty"):
        PackedTokenDataset(config=LoaderConfig(local=str(empty)))


@pytest.mark.parametrize("kind", ["parquet", "csv", "txt", "save_to_disk"])
def test_prepare_other_input_kinds(kind, stdlib_out, tmp_path):
    import datasets

    docs = ["first document", "second, with a comma", "third\nhas two lines"]
    tok = AutoTokenizer.from_pretrained(str(stdlib_out / "tokenizer"))
    ds = datasets.Dataset.from_dict({"body": docs})
    if kind == "parquet":
        ds.to_parquet(tmp_path / "a.parquet")
        inputs = [tmp_path / "*.parquet", "--text-column", "body"]
    elif kind == "csv":
        ds.to_csv(tmp_path / "a.csv")
        inputs = [tmp_path / "a.csv", "--text-column", "body"]
    elif kind == "txt":  # one document per file
        for i, d in enumerate(docs):
            (tmp_path / f"{i}.txt").write_text(d)
        inputs = [tmp_path / "0.txt", tmp_path / "1.txt", tmp_path / "2.txt"]
    else:  # a DatasetDict with its own validation split is used as it is
        datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(
            tmp_path / "dd")
        inputs = [tmp_path / "dd", "--text-column", "body"]
    manifest = _prepare(*inputs, "-o", tmp_path / "out", "--tokenizer", stdlib_out / "tokenizer",
                        "--val-fraction", 0, "--seq-len", SEQ)
    want = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert (manifest["splits"]["train"]["documents"], manifest["splits"]["train"]["tokens"]) == (
        3, want)
    assert list(manifest["splits"]) == (["train", "validation"] if kind == "save_to_disk"
                                        else ["train"])


def test_loader_requires_the_world_in_the_environment(jsonl_out, monkeypatch):
    out, _ = jsonl_out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE .* is not set"):
        PackedTokenDataset(config=LoaderConfig(local=str(out)))


_JOB = '''import sys
import torch.distributed as dist
dist.init_process_group("gloo")
from tailkd_dist.data.dataset import LoaderConfig, make_loader
next(iter(make_loader(LoaderConfig(local=sys.argv[1], split="train", batch_size=2, shuffle=True))))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_jobs_starting_together_on_one_node_do_not_collide(small, tmp_path):
    """Three 2-rank jobs start their loaders at the same moment, twice: streaming's shared-memory
    registration of one job never meets another's (without the node lock in data/remote.py
    this failed or hung within a few rounds: "shared memory registered does not match local
    leader", FileExistsError on a leader)."""
    from trainer_utils import env, free_port

    script = tmp_path / "job.py"
    script.write_text(_JOB)
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(free_port()), str(script), str(small)],
                                  env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(3)]
        try:
            outs = [p.communicate(timeout=180)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("remote, package", [("s3://bucket/shards", "boto3"), ("gs://bucket/shards", "google-cloud-storage"),
                                             ("oci://bucket/shards", "oci")])
def test_a_missing_storage_sdk_is_named_with_what_to_install(remote, package, tmp_path, monkeypatch):
    """The cloud SDKs are optional: a missing one was reported as 'is s3://... a directory written
    by tailkd-prepare-data?', which sends the user to check the wrong thing."""
    from tailkd_dist.data import remote as remote_mod

    def missing(source, local, timeout):
        raise ModuleNotFoundError("No module named 'sdk'", name="sdk")

    monkeypatch.setattr(remote_mod.CloudDownloader, "direct_download", staticmethod(missing))
    with pytest.raises(ValueError) as info:
        remote_mod.fetch_file(remote, "manifest.json", tmp_path / "local", timeout=5, written_by="tailkd-prepare-data")
    text = str(info.value)
    assert f"needs the Python package {package}" in text and f"pip install {package}" in text, text
    assert "a directory written by" not in text and list((tmp_path / "local").iterdir()) == []


def _stop_signal_handlers(_):
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_tokeniser_workers_die_of_sigterm_and_leave_ctrl_c_to_the_parent(stdlib_out):
    """A forked worker inherited the tool's unwind handler: a SIGTERM from Pool.terminate() could
    be dropped where Python drops a handler's exception, the worker then waited forever on the
    queue lock the terminating parent held, and so did the parent (seen once in the suite: a
    22-minute hang in this file's fixture). Workers now run with SIGTERM at its default and
    SIGINT ignored; the parent keeps its own handlers, in force again after the pool ends."""
    import signal

    from tailkd_dist.data.prepare import _encoder
    from tailkd_dist.signals import unwind_on_signals

    with unwind_on_signals("tailkd-test"):
        mine = signal.getsignal(signal.SIGTERM)
        with _encoder(2, str(stdlib_out / "tokenizer")) as encode:
            assert list(encode(_stop_signal_handlers, range(4))) == [(True, True)] * 4
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGINT}
