"""Session fixtures: the chat engine (tokenizer, R1-style template, generation_config.json) shared by the
scheduler, server and serving-benchmark tests; tiny-r1's quantized engines shared by the quantization and verify
tests; tiny-r1 with its MTP module (--mtp) for the speculative-decoding tests."""

import os

import pytest

from tests.checkout import make_importable

os.environ.setdefault("MOETRT_QUIET", "1")
make_importable()  # a checkout that is not installed (a bare GPU machine) still runs its tests

CHAT_ENGINE_PROFILE = dict(max_batch=16, max_seq=32, max_context=1024)


@pytest.fixture(scope="session")
def chat_engine_dir(tmp_path_factory):
    """Built once per session: prompts over 32 tokens prefill in chunks, 16 requests decode together."""
    from moetrt.export.engine import build_engine
    from moetrt.settings import BuildProfile
    from tests.chat_checkpoint import make_chat_checkpoint

    checkpoint = make_chat_checkpoint(tmp_path_factory.mktemp("chat-ckpt"))
    return build_engine(checkpoint, tmp_path_factory.mktemp("chat") / "tiny-chat", backend="ort",
                        profile=BuildProfile(**CHAT_ENGINE_PROFILE))


@pytest.fixture(scope="session")
def tiny_r1_quantized(tmp_path_factory):
    """`get(quantize, moe_kernel)` -> models/tiny-r1 built with that quantization and expert kernel, once per
    session (each build traces the model)."""
    from pathlib import Path

    from moetrt.export.engine import build_engine
    from moetrt.settings import OrtOptions

    checkpoint = Path(__file__).parents[1] / "models" / "tiny-r1"
    built = {}

    def get(quantize: str, moe_kernel: str = "auto"):
        if (quantize, moe_kernel) not in built:
            out = tmp_path_factory.mktemp("quantized") / f"tiny-r1-{quantize}-{moe_kernel}"
            built[quantize, moe_kernel] = build_engine(checkpoint, out, backend="ort", quantize=quantize,
                                                       ort=OrtOptions(moe_kernel=moe_kernel))
        return built[quantize, moe_kernel]

    return get


@pytest.fixture(scope="session")
def tiny_r1_mtp_dir(tmp_path_factory):
    """models/tiny-r1 built with its multi-token-prediction module (--mtp), once per session."""
    from pathlib import Path

    from moetrt.export.engine import build_engine

    checkpoint = Path(__file__).parents[1] / "models" / "tiny-r1"
    return build_engine(checkpoint, tmp_path_factory.mktemp("mtp") / "tiny-r1-mtp", backend="ort", mtp=True)
