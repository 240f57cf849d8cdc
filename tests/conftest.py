import os

# DeepSpeed picks the CPU accelerator by itself here; saying so silences its warning.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tests spawn up to 4 ranks on a 2-core machine: one intra-op thread per process avoids
# oversubscription (minutes instead of seconds). Set before torch is imported anywhere, so
# spawned processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


def _snapshot(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Shards of the python-stdlib slice from the real prepare tool, made once per test run
    (13 s each time). Tests read it only (one that damages data works on a copy); the teardown
    checks that no file was changed, added or removed."""
    from trainer_utils import prepare_data

    out = prepare_data(tmp_path_factory.mktemp("data") / "stdlib")
    before = _snapshot(out)
    yield out
    assert _snapshot(out) == before, "a test changed the shared prepared data: work on a copy"


@pytest.fixture
def clean_shm():
    """Remove the shared-memory files the `deepspeed` launcher leaves after a run."""
    yield
    from trainer_utils import cleanup_shm

    cleanup_shm()


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A small slice of the python-stdlib shards (169 rows of 32 tokens): the teacher cache's."""
    from trainer_utils import prepare_data

    return prepare_data(tmp_path_factory.mktemp("small") / "stdlib", docs=6)


@pytest.fixture(scope="session")
def cache1(small, tmp_path_factory):
    """A teacher cache of ``small`` written by one process (FSDP2's teacher, fp32, pieces of 16
    rows); tests compare other writers' bytes with it and only read it."""
    from teacher_cache_utils import config, tree, write

    tmp = tmp_path_factory.mktemp("cache1")
    cfg = config(tmp / "c.yaml", small, tmp / "unused", cache=tmp / "cache")
    out = write(cfg)
    assert "wrote" in out.stdout and "bytes/token" in out.stdout, out.stdout
    before = tree(tmp / "cache")
    yield tmp / "cache"
    assert tree(tmp / "cache") == before, "a test changed the shared cache: work on a copy"
