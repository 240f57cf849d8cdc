"""Cluster launch, for real, on one machine:

* a single-node SLURM (Debian's slurm-wlm + munge, daemons in the foreground, slurm.conf in a
  temporary directory) runs slurm/train_deepspeed.sbatch to completion, then
  slurm/train_torchrun.sbatch on the same output directory, which is signalled (USR1 to the
  batch shell, what ``--signal=B:USR1@...`` does before the time limit), checkpoints, requeues
  itself and resumes;
* two "hosts" (network namespaces joined by a veth pair, a private /dev/shm each) run
  ``torchrun --nnodes 2`` (c10d rendezvous) and the ``deepspeed`` launcher with a 2-host
  hostfile (``--no_ssh --node_rank``, as the batch script does), ZeRO-3 with the loss group
  spanning both hosts: same per-step losses as a single-host run;
* a rank stopped mid-step (SIGSTOP) makes the other exit within engine.dist_timeout_s with a
  line naming the rank it waited for;
* the preflight: OK for the tiny config, TOO BIG for a 70B teacher on a small device, vocabulary
  and tokenizer mismatches, a world size that does not divide, unreadable data.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trainer_utils import REPO, close_by_step, env, free_port, losses, write_config

SBIN = os.pathsep.join(["/usr/sbin", "/sbin", os.environ.get("PATH", "")])
SLURM_BINS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
HAVE_SLURM = all(shutil.which(b, path=SBIN) for b in SLURM_BINS)
HAVE_NETNS = (hasattr(os, "geteuid") and os.geteuid() == 0
              and all(shutil.which(b, path=SBIN) for b in ("ip", "unshare", "mount")))
REL = 1e-5
_REFERENCE: dict = {}  # single-host losses of the ZeRO-3 / loss-group-2 config, once computed


def zero3_lg2(path: Path, data: Path, out: Path, **kw) -> Path:
    """The tiny config with ZeRO-3 and the vocabulary split over 2 ranks."""
    return write_config(path, data, out, loss__loss_group_size=2,
                        engine__ds_config=str(REPO / "ds_configs/zero3.json"),
                        checkpoint__export_hf_at_end=False, **kw)


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """End a process we started (and its process group), politely then not."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


# ============================================================================================
# preflight (in-process, no training)
# ============================================================================================
LLAMA_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 max_position_embeddings=8192)
LLAMA_8B = dict(LLAMA_70B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32)


def _preflight(path: Path, world_size: int, **kw):
    from tailkd_dist.config import load_config
    from tailkd_dist.preflight import run_preflight

    return run_preflight(load_config(path), world_size=world_size, **kw)


def _other_tokenizer(data: Path, tmp: Path) -> Path:
    """The shards' tokenizer with two token ids swapped: same size, other token-id mapping."""
    tok = tmp / "other_tokenizer"
    shutil.copytree(data / "tokenizer", tok)
    spec = json.loads((tok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    return tok


def test_preflight_ok_for_the_tiny_config(data, tmp_path):
    rep = _preflight(zero3_lg2(tmp_path / "c.yaml", data, tmp_path / "run"), 2)
    assert rep.ok and rep.verdict == "OK", rep.lines()
    assert rep.memory.verdict == "OK" and rep.memory.capacity > 0
    assert rep.vocab.vocab == 512
    assert rep.lines()[-1].startswith("preflight: OK")
    assert not (tmp_path / "run").exists()  # the preflight writes nothing


def test_preflight_70b_teacher_is_too_big_for_a_small_device(data, tmp_path, capsys):
    from tailkd_dist.preflight import main

    cfg = write_config(tmp_path / "big.yaml", data, tmp_path / "run",
                       models__teacher={"config": LLAMA_70B}, models__student={"config": LLAMA_8B},
                       loss__loss_group_size=8, data__micro_batch_size=1)
    rep = _preflight(cfg, 8, gpus_per_node=8, device_memory_gib=16)
    assert rep.verdict == "TOO BIG" and not rep.ok
    assert rep.memory.device == "cuda" and rep.memory.per_rank > 16 * 2**30
    (line,) = [p for p in rep.problems if "TOO BIG" in p]
    assert "what fits:" in line and "GiB per rank" in line, line
    # Teacher 70.6B + student 8.0B parameters, read from the configs alone.
    assert any("70.55B" in i for i in rep.info) and any("8.03B" in i for i in rep.info), rep.info
    # The same config fits 80 GiB GPUs.
    assert _preflight(cfg, 8, gpus_per_node=8, device_memory_gib=80).ok
    # The CLI: exit 2, the verdict, one error line per problem.
    capsys.readouterr()
    assert main([str(cfg), "--world-size", "8", "--gpus-per-node", "8", "--device-memory-gib", "16",
                 "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("preflight: TOO BIG")
    errors = err.strip().splitlines()
    assert errors and all(e.startswith("tailkd-preflight: error: ") for e in errors), err
    assert any("TOO BIG" in e for e in errors)


def test_preflight_host_ram_of_a_70b_teacher_directory_with_and_without_sharded_load(data, tmp_path):
    """A 70B teacher given as a directory (its config and a sparse 5 GB checkpoint file: no
    disk, no weights): with engine.sharded_load each of 8 GPU ranks on a node reads one
    checkpoint file on the host, without it each loads the whole teacher in fp32 (282 GB),
    which no 1 TiB node can hold 8 times."""
    import os

    from transformers import AutoConfig

    tdir = tmp_path / "teacher70b"
    cfg70 = dict(LLAMA_70B)
    AutoConfig.for_model(cfg70.pop("model_type"), **cfg70).save_pretrained(tdir)
    # One shard of 30 as a real checkpoint has it (its index, a safetensors header whose tensor
    # spans the file), sparse: the preflight reads the header and the size, no weights.
    data_bytes = 5 * 2**30 - 8 - 256  # a 256-byte header (JSON padded with spaces)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [data_bytes // 2], "data_offsets": [0, data_bytes]}})
    header = header.encode().ljust(256)
    with open(tdir / "model-00001-of-00030.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(5 * 2**30)
    (tdir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001-of-00030.safetensors"}}))
    teacher = {"path": str(tdir), "tokenizer": str(data / "tokenizer")}
    reports = {}
    for zi in (True, False):
        cfg = write_config(tmp_path / f"zi{zi}.yaml", data, tmp_path / "run",
                           models__teacher=teacher, models__student={"config": LLAMA_8B},
                           engine__ds_config=str(REPO / "ds_configs/zero3.json"), engine__sharded_load=zi,
                           loss__loss_group_size=8, data__micro_batch_size=1)
        reports[zi] = _preflight(cfg, 8, gpus_per_node=8, device_memory_gib=80, host_memory_gib=1024)
    gib = 2**30
    student_fp32 = 4 * 8.03e9
    # sharded_load: 8 x (the student's fp32 copy + one 5 GiB teacher file)
    assert abs(reports[True].memory.host_per_node - 8 * (student_fp32 + 5 * gib)) < 0.01 * 8 * student_fp32
    assert reports[True].ok, reports[True].problems
    # whole: 8 x (student + teacher in fp32) > 1 TiB, and the fix is named
    assert reports[False].memory.host_per_node > 8 * 4 * 70e9
    (line,) = [p for p in reports[False].problems if "host RAM per node" in p]
    assert "engine.sharded_load: true" in line, line
    assert os.path.getsize(tdir / "model-00001-of-00030.safetensors") == 5 * gib
    # FSDP2's sharded load: rank 0 alone reads the teacher directory (once per node, in fp32)
    cfg = write_config(tmp_path / "fsdp2.yaml", data, tmp_path / "run", models__teacher=teacher,
                       models__student={"config": LLAMA_8B}, engine__kind="fsdp2",
                       loss__loss_group_size=8, data__micro_batch_size=1)
    rep = _preflight(cfg, 8, gpus_per_node=8, device_memory_gib=80, host_memory_gib=1024)
    teacher_fp32 = 4 * 70.55e9
    assert abs(rep.memory.host_per_node - (8 * student_fp32 + teacher_fp32)) < 0.01 * teacher_fp32


def test_preflight_flags_vocabulary_and_tokenizer_mismatches(data, tmp_path):
    from trainer_utils import STUDENT, TEACHER

    other = _other_tokenizer(data, tmp_path)
    tok = str(data / "tokenizer")
    cases = {
        # the student's lm_head has fewer rows than the tokenizer has tokens
        "vocab": (dict(models__student={"config": dict(STUDENT, vocab_size=256), "tokenizer": tok}),
                  "vocabulary:", "cannot represent every token"),
        # teacher and student with different tokenizers
        "tokenizers": (dict(models__teacher={"config": TEACHER, "tokenizer": str(other)}),
                       "vocabulary:", "differ"),
        # both models on another tokenizer than the shards were written with
        "shards": (dict(models__teacher={"config": TEACHER, "tokenizer": str(other)},
                        models__student={"config": STUDENT, "tokenizer": str(other)}),
                   "shards:", "tokenised with"),
        "k": (dict(loss__k=600), "config key 'loss.k' = 600", "smaller than the vocabulary"),
    }
    for name, (kw, prefix, needle) in cases.items():
        rep = _preflight(write_config(tmp_path / f"{name}.yaml", data, tmp_path / name, **kw), 1)
        hits = [p for p in rep.problems if p.startswith(prefix) and needle in p]
        assert hits and not rep.ok, (name, rep.problems)


def test_preflight_flags_layout_and_data(data, tmp_path):
    cfg = zero3_lg2(tmp_path / "c.yaml", data, tmp_path / "run")
    rep = _preflight(cfg, 3)
    assert [p for p in rep.problems if p.startswith("loss.loss_group_size = 2") and "world size = 3" in p], rep.problems
    rep = _preflight(cfg, 6, gpus_per_node=4)
    assert [p for p in rep.problems if "not a whole number of nodes" in p], rep.problems
    # no manifest, a corrupt manifest, a missing split index
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(data, corrupt)
    (corrupt / "manifest.json").write_text("{not json")
    nosplit = tmp_path / "nosplit"
    shutil.copytree(data, nosplit)
    (nosplit / "train" / "index.json").unlink()
    for where, needle in ((empty, "does not exist"), (corrupt, "not valid JSON"), (nosplit, "index.json")):
        c = write_config(tmp_path / f"{where.name}.yaml", data, tmp_path / "run", data__path=str(where))
        rep = _preflight(c, 1)
        assert [p for p in rep.problems if p.startswith("data") and needle in p], (where.name, rep.problems)


# ============================================================================================
# the batch scripts, statically
# ============================================================================================
@pytest.mark.parametrize("script", ["train_deepspeed.sbatch", "train_torchrun.sbatch"])
def test_batch_scripts_parse_and_ask_for_requeue_and_signal(script):
    path = REPO / "slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    directives = [ln for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", d) for d in directives), directives
    assert any(d.startswith("#SBATCH --ntasks-per-node=1") for d in directives)


# ============================================================================================
# SLURM
# ============================================================================================
class Slurm:
    """slurmctld + slurmd + a private munged, in the foreground, configured in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        self.conf = root / "slurm.conf"
        self.env = {**env(), "SLURM_CONF": str(self.conf), "PATH": SBIN}

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen([shutil.which(name, path=SBIN), *args], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir()
        # munged wants every directory above its socket searchable by all (pytest's are 0700).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="tailkd-munge-"))
        os.chmod(self.munge_dir, 0o755)
        m = self.munge_dir
        key = m / "munge.key"
        if Path("/etc/munge/munge.key").is_file():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        sock = m / "munge.sock"
        self._daemon("munged", "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                     f"--log-file={r}/munged.log", f"--seed-file={m}/munged.seed")
        self._wait(lambda: sock.exists(), 20, "munged did not create its socket")
        node = subprocess.run([shutil.which("slurmd", path=SBIN), "-C"], capture_output=True, text=True,
                              env=self.env).stdout.splitlines()[0]
        host = re.search(r"NodeName=(\S+)", node).group(1)
        cpus = re.search(r"CPUs=(\d+)", node).group(1)
        mem = re.search(r"RealMemory=(\d+)", node).group(1)
        self.conf.write_text(f"""ClusterName=tailkd
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld did not come up")
        self._daemon("slurmd", "-D", "-f", str(self.conf))
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                   "the node never became idle")

    def _wait(self, ok, timeout: float, what: str) -> None:
        t0 = time.time()
        while not ok():
            for p in self.procs:
                assert p.poll() is None, f"{what}: {p.args[0]} exited ({p.returncode}); see {self.root}"
            assert time.time() - t0 < timeout, f"{what} ({self.root})"
            time.sleep(0.3)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([shutil.which(cmd[0], path=SBIN), *cmd[1:]], capture_output=True, text=True,
                             env=self.env, timeout=60)
        if check and out.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed: {out.stderr}")
        return out

    def sbatch(self, script: str, *args: str, job_env: dict, cwd: Path) -> str:
        out = subprocess.run([shutil.which("sbatch", path=SBIN), "--parsable", "-o", str(cwd / "slurm-%j.out"),
                              str(REPO / "slurm" / script), *args],
                             capture_output=True, text=True, env={**self.env, **job_env}, cwd=cwd, timeout=60)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        line = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def wait_job(self, job: str, states: tuple[str, ...], timeout: float, log: Path | None = None) -> dict:
        t0 = time.time()
        while True:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            if time.time() - t0 > timeout:
                tail = log.read_text()[-4000:] if log and log.exists() else ""
                raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        for job in self.jobs:
            self.run("scancel", job, check=False)
        for job in self.jobs:  # let slurmd end the job's processes before it goes away
            t0 = time.time()
            while time.time() - t0 < 30 and self.job(job).get("JobState") in ("RUNNING", "COMPLETING", "CONFIGURING"):
                time.sleep(0.5)
        for p in reversed(self.procs):
            _stop(p)
        if getattr(self, "munge_dir", None):
            shutil.rmtree(self.munge_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not HAVE_SLURM:
        pytest.skip("slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _step_reached(path: Path, step: int) -> bool:
    if not path.exists():
        return False
    return any(json.loads(ln)["step"] >= step for ln in path.read_text().splitlines() if ln.strip())


@pytest.mark.slow
def test_slurm_batch_scripts_complete_requeue_and_resume(slurm, data, tmp_path):
    out = tmp_path / "run"
    cfg = zero3_lg2(tmp_path / "c.yaml", data, out)
    job_env = {"CONFIG": str(cfg), "OUTPUT_DIR": str(out), "GPUS_PER_NODE": "2", "PYTHON": sys.executable}

    # 1. The deepspeed script, 3 steps (preflight included): completes, checkpoints, TensorBoard.
    port_a = str(free_port())
    a = slurm.sbatch("train_deepspeed.sbatch", "optim.max_steps=3", cwd=tmp_path,
                     job_env={**job_env, "MASTER_PORT": port_a})
    log_a = tmp_path / f"slurm-{a}.out"
    info = slurm.wait_job(a, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300, log_a)
    text = log_a.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "0"
    assert "preflight: OK" in text and "hostfile: " in text and " slots=2" in text
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000003"
    assert (out / "checkpoints/step_00000003/COMPLETE").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    _REFERENCE.setdefault("zero3_lg2", losses(out))  # a single-host 2-process run of this config
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port_a}_*"))  # the script cleans up

    # 2. The torchrun script continues the run to 12 steps. USR1 to the batch shell (what
    #    --signal=B:USR1@T sends before the time limit) -> the trainer saves and exits -> the
    #    script requeues the job -> the new run resumes from that checkpoint and finishes.
    b = slurm.sbatch("train_torchrun.sbatch", "optim.max_steps=12", cwd=tmp_path,
                     job_env={**job_env, "PREFLIGHT": "0", "MASTER_PORT": str(free_port())})
    log_b = tmp_path / f"slurm-{b}.out"
    t0 = time.time()
    while not _step_reached(out / "metrics.jsonl", 5):
        assert slurm.job(b)["JobState"] in ("PENDING", "RUNNING"), log_b.read_text()[-4000:]
        assert time.time() - t0 < 240, "job 2 never reached step 5"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", b)
    info = slurm.wait_job(b, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), 120, log_b)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, log_b.read_text()[-4000:])
    stopped_at = int((out / "checkpoints/latest").read_text().strip()[len("step_"):])
    assert 5 <= stopped_at < 12, stopped_at
    # SLURM holds a requeued job for about 2 minutes; release it, but not within the second its
    # old credential was revoked (slurmd would refuse the launch: "Job credential revoked").
    time.sleep(2.5)
    slurm.run("scontrol", "update", f"JobId={b}", "StartTime=now")
    info = slurm.wait_job(b, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, log_b)
    text = log_b.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", info  # requeued once, not after the normal finish
    assert "resumed from step_00000003" in text  # the second job continued the first one
    assert f"requeueing job {b}; it resumes from step {stopped_at}" in text
    assert f"resumed from step_{stopped_at:08d}" in text, text[-4000:]
    assert "(restart 1)" in text
    assert (out / "checkpoints/latest").read_text().strip() == "step_00000012"
    steps = losses(out)
    assert sorted(steps) == list(range(1, 13)) and all(math.isfinite(v) for v in steps.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted({e.step for e in acc.Scalars("loss/total")}) == list(range(1, 13))


@pytest.mark.slow
def test_slurm_script_writes_a_teacher_cache_stopped_requeued_and_finished(slurm, small, cache1, tmp_path):
    """COMMAND=cache-teacher: the torchrun script runs tailkd-cache-teacher on 2 ranks. USR1 to
    the batch shell once a piece is on disk -> the writers finish their round and stop ->
    the script requeues the job -> the new run goes on from the written pieces and completes:
    the same bytes as one uninterrupted process."""
    from teacher_cache_utils import config, tree

    cache = tmp_path / "cache"
    cfg = config(tmp_path / "c.yaml", small, tmp_path / "unused", cache=cache)
    release = tmp_path / "release"
    job_env = {"CONFIG": str(cfg), "COMMAND": "cache-teacher", "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
               "MASTER_PORT": str(free_port()), "COMMAND_ARGS": "--piece-rows 16 --no-progress",
               # each writer pauses once after its first piece, until the test releases it
               "TAILKD_TEST_PAUSE": "cache_piece:120", "TAILKD_TEST_RELEASE": str(release)}
    job = slurm.sbatch("train_torchrun.sbatch", cwd=tmp_path, job_env=job_env)
    log = tmp_path / f"slurm-{job}.out"
    t0 = time.time()
    while not (cache / "train" / "000000").is_dir():
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        assert time.time() - t0 < 240, "the writer never wrote a piece"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    # The script relays USR1 to the writers within its 2 s poll; then they may go on.
    t0 = time.time()
    while "USR1: the cache writer will stop" not in log.read_text():
        assert time.time() - t0 < 30, log.read_text()[-4000:]
        time.sleep(0.2)
    time.sleep(8)
    release.touch()
    info = slurm.wait_job(job, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), 120, log)
    text = log.read_text()
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, text[-4000:])
    assert not (cache / "manifest.json").exists()
    written = sorted(str(p.relative_to(cache)) for p in cache.glob("*/[0-9]*") if p.is_dir())
    assert written == ["train/000000", "train/000001"], (written, text[-4000:])
    assert "tailkd-cache-teacher: stopped by SIGUSR1 with 2 of 11 pieces written" in text, text[-4000:]
    assert f"requeueing job {job}; it goes on from 2 written pieces" in text
    time.sleep(2.5)  # (see the training test: a requeued job's credential)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1" and "(restart 1)" in text and "2 pieces written" in text
    assert "cache-teacher exited with 0; cache " in text and "11 pieces written, complete" in text, text[-4000:]
    assert tree(cache) == tree(cache1)


# ============================================================================================
# two hosts in network namespaces
# ============================================================================================
ENTRY = '''"""tailkd-train with streaming's num_canonical_nodes pinned (TK_CANONICAL_NODES): streaming's
sample order depends on it, and it defaults to the number of physical nodes."""
import os, sys
import tailkd_dist.data.dataset as ds
_make = ds.make_loader
def make_loader(cfg, *a, **k):
    if cfg.num_canonical_nodes is None:
        cfg.num_canonical_nodes = int(os.environ["TK_CANONICAL_NODES"])
    return _make(cfg, *a, **k)
ds.make_loader = make_loader
from tailkd_dist.train import main
sys.exit(main(sys.argv[1:]))
'''


class Hosts:
    """Two network namespaces joined by a veth pair, 10.77.0.1/24 and 10.77.0.2/24."""

    def __init__(self):
        tag = f"tk{os.getpid() % 100000}"
        self.ns = [f"{tag}a", f"{tag}b"]
        self.dev = [f"{n}v" for n in self.ns]  # <= 15 characters
        self.addr = ["10.77.0.1", "10.77.0.2"]

    def ip(self, *args: str) -> None:
        subprocess.run([shutil.which("ip", path=SBIN), *args], check=True, capture_output=True, text=True)

    def up(self) -> None:
        for ns in self.ns:
            self.ip("netns", "add", ns)
        self.ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr):
            self.ip("link", "set", dev, "netns", ns)
            self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self.ip("-n", ns, "link", "set", dev, "up")
            self.ip("-n", ns, "link", "set", "lo", "up")

    def rx_bytes(self, i: int) -> int:
        """Bytes host i received on its veth."""
        out = subprocess.run([shutil.which("ip", path=SBIN), "-j", "-s", "-n", self.ns[i], "link", "show", "dev",
                              self.dev[i]], check=True, capture_output=True, text=True).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def down(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth pair
            subprocess.run([shutil.which("ip", path=SBIN), "netns", "del", ns], capture_output=True)

    def popen(self, i: int, cmd: list[str], log: Path, extra_env: dict) -> subprocess.Popen:
        """``cmd`` on host i: its own network namespace and its own /dev/shm."""
        e = {**env(), **extra_env, "GLOO_SOCKET_IFNAME": self.dev[i], "PATH": SBIN}
        inner = "mount -t tmpfs tmpfs /dev/shm && exec \"$@\""
        return subprocess.Popen(
            [shutil.which("ip", path=SBIN), "netns", "exec", self.ns[i], "unshare", "-m", "sh", "-c", inner, "sh", *cmd],
            env=e, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _run_pair(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    t0 = time.time()
    try:
        for p in procs:
            p.wait(max(1.0, timeout - (time.time() - t0)))
    finally:
        for p in procs:
            _stop(p)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{p.args[-8:]} exited {p.returncode}:\n{log.read_text()[-5000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NETNS, reason="needs root, iproute2 (ip netns) and util-linux (unshare)")
def test_two_hosts_torchrun_and_deepspeed_launcher_match_one_host(data, tmp_path):
    if "zero3_lg2" not in _REFERENCE:  # the SLURM test computes it when it runs first
        ref_out = tmp_path / "ref"
        cfg = zero3_lg2(tmp_path / "ref.yaml", data, ref_out)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "tailkd_dist.train", str(cfg)], env=env(), cwd=REPO, check=True,
                       capture_output=True, timeout=300)
        _REFERENCE["zero3_lg2"] = losses(ref_out)
    ref = _REFERENCE["zero3_lg2"]
    assert sorted(ref) == [1, 2, 3]
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "tk_entry.py").write_text(ENTRY)
    # One physical node ran the reference: pin streaming's canonical nodes to 1 so the two hosts
    # read the same global batches (with 2 nodes it would default to 2: another sample order).
    pin = {"TK_CANONICAL_NODES": "1"}
    hosts = Hosts()
    try:
        hosts.up()
        # torchrun, c10d rendezvous on host 0 (is_host and local_addr: the hostname resolves to
        # 127.0.0.1 inside a namespace)
        out = tmp_path / "torchrun"
        cfg = zero3_lg2(tmp_path / "torchrun.yaml", data, out)
        port = free_port()
        logs = [tmp_path / f"torchrun{i}.log" for i in (0, 1)]
        procs = [hosts.popen(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                 "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts.addr[0]}:{port}",
                                 "--rdzv_id", "tk", "--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr",
                                 hosts.addr[i], "--max_restarts", "0", str(entry / "tk_entry.py"), str(cfg)],
                             logs[i], pin) for i in (0, 1)]
        _run_pair(procs, logs, 300)
        close_by_step(losses(out), ref, REL, "torchrun --nnodes 2")
        moved = hosts.rx_bytes(1)
        assert moved > 100_000, f"only {moved} bytes crossed the veth pair"  # the ranks talked over it

        # the deepspeed launcher, a 2-host hostfile, one launcher per host (as slurm/train_deepspeed.sbatch)
        out = tmp_path / "deepspeed"
        cfg = zero3_lg2(tmp_path / "deepspeed.yaml", data, out)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("host0 slots=1\nhost1 slots=1\n")
        port = free_port()
        logs = [tmp_path / f"deepspeed{i}.log" for i in (0, 1)]
        procs = [hosts.popen(i, [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                                 "--no_ssh", "--node_rank", str(i), "--master_addr", hosts.addr[0],
                                 "--master_port", str(port), str(entry / "tk_entry.py"), str(cfg)],
                             logs[i], pin) for i in (0, 1)]
        _run_pair(procs, logs, 300)
        close_by_step(losses(out), ref, REL, "deepspeed launcher, 2-host hostfile")
        assert hosts.rx_bytes(1) > moved + 100_000
        assert "dist_world_size=2" in logs[1].read_text() and "node_rank=1" in logs[1].read_text()
    finally:
        hosts.down()


# ============================================================================================
# a rank that stops mid-step
# ============================================================================================
STOP_HOOK = '''"""Rank STOP_RANK stops itself (SIGSTOP) at the start of its STOP_AT-th backward, after the
step's forward collectives: the others then wait in ZeRO's gradient reduction."""
import os, signal, sys
from tailkd_dist.engines import deepspeed_engine
_backward = deepspeed_engine.DeepSpeedAdapter.backward
_calls = [0]
def backward(self, loss):
    _calls[0] += 1
    if self.topo.rank == int(os.environ["STOP_RANK"]) and _calls[0] == int(os.environ["STOP_AT"]):
        print(f"STOPPING rank {self.topo.rank}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return _backward(self, loss)
deepspeed_engine.DeepSpeedAdapter.backward = backward
from tailkd_dist.train import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_stopped_rank_makes_the_survivor_fail_within_the_timeout(data, tmp_path):
    """ZeRO-2 reduces gradients on DeepSpeed's own data-parallel group, which torch creates with
    its 30-minute default unless the configured timeout is inherited (parallel/liveness.py)."""
    import psutil

    timeout = 20
    hook = tmp_path / "entry"
    hook.mkdir()
    (hook / "stop_hook.py").write_text(STOP_HOOK)
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=1000,
                       engine__dist_timeout_s=timeout, checkpoint__export_hf_at_end=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "--max_restarts", "0", str(hook / "stop_hook.py"), str(cfg)],
        env={**env(), "STOP_RANK": "1", "STOP_AT": "3"}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers, stopped_at, exited_at = None, None, None
    try:
        t0 = time.time()
        while exited_at is None:
            assert proc.poll() is None or stopped_at is not None, "torchrun ended before the stop"
            if workers is None:
                kids = psutil.Process(proc.pid).children()
                workers = sorted(kids, key=lambda p: p.pid) if len(kids) == 2 else None
            elif stopped_at is None:
                if workers[1].status() == psutil.STATUS_STOPPED:
                    stopped_at = time.time()
            elif not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE:
                exited_at = time.time()
            assert time.time() - t0 < 240, "rank 1 never stopped"
            assert stopped_at is None or time.time() - stopped_at < timeout + 60, (
                f"rank 0 still waits {timeout + 60} s after rank 1 stopped (engine.dist_timeout_s={timeout}): "
                "the collective timeout does not reach every process group")
            time.sleep(0.1)
        workers[1].kill()  # torchrun would give the stopped rank 30 s to answer SIGTERM
        output = proc.communicate(timeout=60)[0]
    finally:
        if workers:
            for w in workers:
                try:
                    w.kill()
                except psutil.Error:
                    pass
        _stop(proc)
    waited = exited_at - stopped_at
    assert proc.returncode != 0
    assert timeout - 1 <= waited <= timeout + 25, f"rank 0 exited {waited:.1f} s after rank 1 stopped"
    lines = [ln for ln in output.splitlines() if ln.startswith("tailkd-train: error: rank 0/2")]
    assert lines, output[-5000:]
    assert "gave up on a collective during step 3" in lines[0] and "waiting for rank 1 (" in lines[0], lines[0]
    assert f"engine.dist_timeout_s = {timeout} s" in lines[0] and "Timed out" in lines[0], lines[0]
    # one line from the surviving rank, no traceback from it (torchrun's own summary aside)
    assert not [ln for ln in output.splitlines() if ln.startswith("[rank0]:")], output[-5000:]
