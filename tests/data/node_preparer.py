"""One "node" of tests/data/test_prepare.py's shared-store test: the first process of its node prepares a local
store that another node prepares at the same time (`python -m tests.data.node_preparer STORE_DIR COUNT_FILE RANK`)."""

import sys
import time
from types import SimpleNamespace

from hydra.utils import instantiate

import segplat.data.datamodule as datamodule
from segplat.data.store import PatchStore
from tests.data.test_prepare import TINY_STORE, _compose_prepare

store_dir, count_file, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_prepare = datamodule.prepare_store


def slow_counted_prepare(*args, **kwargs):
    with open(count_file, "a") as fh:  # O_APPEND: one line per call, whichever process makes it
        fh.write(f"{rank}\n")
    time.sleep(2.0)  # long enough that, without the lock, the other node would start its own prepare
    return real_prepare(*args, **kwargs)


datamodule.prepare_store = slow_counted_prepare
dm = instantiate(_compose_prepare([*TINY_STORE, f"dataset.store_dir={store_dir}"]).dataset)
# two nodes of one process each: every process is its node's first, rank 0 is also the global first
node = SimpleNamespace(num_processes=2, is_main_process=rank == 0, is_local_main_process=True)
location, _ = dm._ensure_store(node)
print(PatchStore(location).build)
