import os

# DeepSpeed picks the CPU accelerator by itself here; saying so silences its warning.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tests spawn up to 4 ranks on a 2-core machine: one intra-op thread per process avoids
# oversubscription (minutes instead of seconds). Set before torch is imported anywhere, so
# spawned processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
