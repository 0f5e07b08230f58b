"""`make gpu-check`'s first step: exit 1 with one line where torch sees no CUDA GPU, rather than run `pytest -m gpu`
to a pass in which every test skipped."""

import sys

import torch


def main(command: str = "gpu-check") -> int:
    """0 where torch sees a CUDA GPU; else one line on stderr, naming `command`, and 1."""
    if torch.cuda.is_available():
        return 0
    print(
        f"{command}: no CUDA GPU visible to torch {torch.__version__}; run it on an NVIDIA GPU machine "
        "with a CUDA build of torch (make install TORCH=...)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
