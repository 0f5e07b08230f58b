import os

from tests.checkout import make_importable

os.environ.setdefault("MOETRT_QUIET", "1")
make_importable()  # a checkout that is not installed (a bare GPU machine) still runs its tests
