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
