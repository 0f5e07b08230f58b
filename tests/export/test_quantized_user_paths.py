"""Quantized engines as a new user meets them: what the manifest and `moetrt info` claim when some weights cannot be
quantized (sizes that are not whole groups), and the one-line refusals of options that cannot work together."""

import pytest

from moetrt.config import parse_config
from moetrt.errors import MoetrtError
from moetrt.formats import Quantization
from moetrt.quantization import QuantScheme
from tests.checkpoints import BASE

# tests/checkpoints.py's base model: hidden 48, expert width 24, q_lora_rank 24, 4 heads of v 10 (o_proj in 40).
SMALL = {**BASE, "model_type": "deepseek_v3"}


def _quantized(raw: dict, scheme: QuantScheme) -> Quantization:
    """quantize_model's description of a meta model built from config dict `raw` (no weights, no export)."""
    import torch

    from moetrt.export.model import DeepseekForCausalLM
    from moetrt.export.quantized import quantize_model

    with torch.device("meta"):
        model = DeepseekForCausalLM(parse_config(raw))
    return quantize_model(model, scheme)


def test_manifest_keeps_the_kinds_whose_sizes_are_not_whole_groups():
    """hidden 48 with groups of 32: only the dense MLP's down_proj (in 64) fits, so the manifest must not claim the
    experts, attention, the embedding or lm_head were quantized (it claimed every kind whatever happened)."""
    described = _quantized(SMALL, QuantScheme(4, 32))
    assert described.tensors == ("dense MLPs (1 of 3)",), described
    assert "routed experts (input size not a multiple of 32)" in described.kept
    assert "token embedding (input size not a multiple of 32)" in described.kept
    assert "norms" in described.kept


def test_manifest_counts_kinds_only_partly_quantized():
    """Groups of 16 fit hidden 48 but not q_lora_rank 24 (q_b_proj), 40 (o_proj) or the expert width 24."""
    described = _quantized(SMALL, QuantScheme(8, 16))
    assert "lm_head" in described.tensors and "token embedding" in described.tensors
    assert "attention projections (6 of 12)" in described.tensors  # q_a and kv_a fit, q_b and o_proj not
    assert "attention projections (6 of 12, input size not a multiple of 16)" in described.kept
    assert "routed experts (input size not a multiple of 16)" in described.kept
    assert not any(kind.startswith("routed experts") for kind in described.tensors)


def test_manifest_leaves_out_kinds_the_model_lacks():
    """first_k_dense_replace 0 and no shared experts: neither dense MLPs nor shared experts to speak of."""
    raw = {**SMALL, "hidden_size": 64, "moe_intermediate_size": 32, "q_lora_rank": 32, "v_head_dim": 16,
           "first_k_dense_replace": 0, "n_shared_experts": 0}
    described = _quantized(raw, QuantScheme(4, 32))
    assert described.tensors == ("routed experts", "attention projections", "lm_head", "token embedding")


def test_info_says_experts_kept_float_run_in_the_float_moe_op():
    """`moetrt info` named QMoE for an engine whose experts stayed float32 (their width not whole groups)."""
    from moetrt.formats import OrtSection
    from moetrt.runtime.ort import describe

    section = OrtSection(package="1.0", provider="CPUExecutionProvider", optimization_level="extended",
                         cpu_arch="x86_64", cpu_flags=(), moe_kernel="onnxruntime", expert_slices=2, layout="graph",
                         model="model.onnx")

    class Manifest:  # the fields describe reads
        model_config = parse_config(SMALL)
        quantization = Quantization("int4", 4, 32)

    Manifest.section = section
    lines = describe(Manifest)
    assert any("routed experts   onnxruntime's MoE op," in line for line in lines), lines
    Manifest.quantization = Quantization("int4", 4, 16)
    Manifest.model_config = parse_config({**SMALL, "moe_intermediate_size": 32})
    assert any("onnxruntime's QMoE op (int4)" in line for line in describe(Manifest))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_quantized_build_is_refused_first_in_one_line(tmp_path, dtype):
    """`--dtype bfloat16 --quantize int4` told the user to try float16 (ONNX Runtime's dtype check came first),
    which the quantization check then refused too; from an export, "--dtype float16 needs a re-export". The
    quantization's own refusal comes first now, before the source is even read."""
    from tests.runtime.test_tiny_r1_engine import moetrt_cli

    result = moetrt_cli("build-engine", tmp_path / "no-such-export", "-o", tmp_path / "e", "--dtype", dtype,
                        "--quantize", "int4")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"error: quantized engines compute in float32, not {dtype}; drop --dtype or "
                                     "pass --dtype float32"), result.stderr
    assert not (tmp_path / "e").exists()


def test_reexport_hint_names_the_group_size_asked_for():
    """Building an int4/32 export with --group-size 64 said "re-export ... with --quantize int4" (which gives 32
    again)."""
    from pathlib import Path

    from moetrt.export.engine import check_quantization
    from moetrt.formats import ExportInfo
    from moetrt.settings import BuildConfig

    info = ExportInfo.__new__(ExportInfo)
    object.__setattr__(info, "quantization", Quantization("int4", 4, 32))
    with pytest.raises(MoetrtError) as error:
        check_quantization(info, BuildConfig(quantize="int4", group_size=64), Path("exp"))
    assert str(error.value).endswith("re-export the checkpoint with --quantize int4 --group-size 64"), error.value


@pytest.mark.parametrize("group_size", [48, 0, -1])
def test_a_bad_group_size_is_refused_without_quantize_too(group_size):
    """`--quantize none --group-size 48` (or 0, -1) was accepted silently; the value is checked whatever the scheme."""
    from moetrt.quantization import scheme_for
    from moetrt.settings import BuildConfig

    with pytest.raises(MoetrtError, match=f"--group-size must be a power of two of at least 16, got {group_size}"):
        scheme_for("none", group_size)
    with pytest.raises(MoetrtError, match="--group-size"):
        BuildConfig(group_size=group_size)
    assert scheme_for("none", 64) is None


def test_python_api_refuses_a_group_size_that_is_not_an_int():
    """`build_engine(..., group_size="32")` failed with "'<' not supported between instances of 'str' and 'int'"."""
    from moetrt.export.engine import build_engine

    with pytest.raises(MoetrtError, match="--group-size must be a power of two of at least 16, got '32'"):
        build_engine("no-such-checkpoint", "out", quantize="int4", group_size="32")


def test_a_group_size_that_fits_no_weight_is_refused():
    """Groups of 128 divide none of the small model's input sizes (48, 24, 40, 64): the build went on, wrote a
    float engine labelled int4 ("tensors: ;" in `moetrt info`), and `verify` passed it under int4's thresholds."""
    with pytest.raises(MoetrtError, match=r"^group size 128 divides none of this model's weight input sizes "
                                          r"\(24, 40, 48, 64\): nothing would be quantized; choose a --group-size "
                                          r"that divides them \(e\.g\. 32\)$"):
        _quantized(SMALL, QuantScheme(4, 128))


@pytest.mark.parametrize("command", ["build-engine", "export", "info"])
def test_group_size_without_quantize_is_refused_in_one_line(tmp_path, command):
    """`build-engine CKPT -o E --group-size 64` built a float32 engine and said nothing of the group size."""
    from tests.runtime.test_tiny_r1_engine import TINY_R1, moetrt_cli

    out = [] if command == "info" else ["-o", tmp_path / "e"]
    result = moetrt_cli(command, TINY_R1, *out, "--group-size", "64")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("error: --group-size 64 sizes the blocks of quantized weights: add --quantize "
                                     "int8 or --quantize int4, or leave --group-size out"), result.stderr
    assert list(tmp_path.iterdir()) == []
