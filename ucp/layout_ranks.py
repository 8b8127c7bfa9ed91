"""Moved: the rank-files layout is now the ``ranks`` plug-in pair ``ucp.sources.ranks`` /
``ucp.targets.ranks`` on the engine (``ucp.engine``). This module only re-exports the names
that callers written before the move import; new code imports from the plug-ins."""
from ucp.sources.ranks import (FORMAT_NAME, LAYOUT_FILE, META_FILE, RanksError, load_rank_file,  # noqa: F401
                               load_ranks_full, rank_file_name, read_layout)
from ucp.targets.ranks import save_ranks  # noqa: F401
