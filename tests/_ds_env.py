"""The environment of every DeepSpeed job the tests start: the CPU accelerator, no prebuilt ops, and
one cache for the comm op DeepSpeed JIT-builds with g++ on its first CPU run (~20 s), so that it is
built once per machine rather than once per job."""
from pathlib import Path

DS_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
          "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ucp-torch-extensions")}
