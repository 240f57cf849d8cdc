import os

# DeepSpeed picks the CPU accelerator by itself here; saying so silences its warning.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
