"""The one place that imports mosaicml-streaming; everything else imports it from here.

`streaming/__init__.py` eagerly imports `streaming.vision`, which imports torchvision. PyPI's
torchvision is built against CUDA torch: on a CPU torch build it fails to load
(`operator torchvision::nms does not exist`) and, once installed, also breaks
`from transformers import LlamaForCausalLM`. So the install (README) leaves torchvision out, and
here we register an empty `streaming.vision` module before the first `import streaming`: the text
path (MDSWriter, StreamingDataset, StreamingDataLoader) never touches the vision datasets. We do
it even when torchvision is importable, because a dependency-resolving `pip install` may have put
the broken CUDA build there, and tailkd_dist needs nothing from `streaming.vision`.
"""
from __future__ import annotations

import sys
import types

# setdefault: if streaming (and its vision module) was already imported, keep what is there.
sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))

import streaming  # noqa: E402
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.hashing import get_hash  # noqa: E402
from streaming.base.storage.download import CloudDownloader  # noqa: E402
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN  # noqa: E402

__all__ = [
    "streaming",
    "MDSWriter",
    "StreamingDataLoader",
    "StreamingDataset",
    "CloudDownloader",
    "get_hash",
    "BARRIER_FILELOCK",
    "CACHE_FILELOCK",
    "SHM_TO_CLEAN",
]
