import os

os.environ.setdefault("MOETRT_QUIET", "1")
