"""Half-precision builds: float16 keeps the residual stream in range by dividing it by routed_scaling_factor, a
build whose calibration prompts still overflow is refused with the reason, and a dtype the provider cannot run is
refused before any export work."""

import re

import numpy as np
import pytest
import torch

import moetrt
from moetrt import MoetrtError
from moetrt.export.engine import build_engine
from moetrt.export.model import residual_scale
from moetrt.export.verify import TOLERANCES
from moetrt.runtime.engine import Engine
from moetrt.settings import BuildProfile
from tests.checkpoints import build_model, make_checkpoint

FP16_MAX = 65504.0
SCALE = 16.0  # routed_scaling_factor, the residual stream's divisor in float16
PROFILE = BuildProfile(max_batch=4, max_seq=32, max_context=64)
IDS = np.random.default_rng(0).integers(0, 96, (4, 30))


def write_checkpoint(directory, expert_gain: float):
    """A DeepSeek-V2-style checkpoint, routed_scaling_factor 16, its routed experts' down projections multiplied by
    `expert_gain`, so the residual stream after the first MoE layer (model.layers.1) peaks near 5.6 * gain. All four
    experts serve every token: float16 rounding cannot flip a routing choice, so the comparison with float32
    measures range, not ties. Returns the transformers model (float32)."""
    model = build_model("v2-greedy-yarn", routed_scaling_factor=SCALE, n_routed_experts=4, num_experts_per_tok=4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                parameter.mul_(expert_gain)
    model.save_pretrained(directory)
    return model


def residual_peak(model) -> float:
    """The largest |residual| transformers computes on IDS (hidden states between layers, before the final norm)."""
    with torch.no_grad():
        hidden = model(torch.from_numpy(IDS), output_hidden_states=True).hidden_states
    return max(float(h.abs().max()) for h in hidden[:-1])


@pytest.fixture(scope="module")
def near_1e5(tmp_path_factory):
    """Residual peak ~1.1e5: beyond float16 (65504), within 16 * 65504 once divided by the scaling factor."""
    directory = tmp_path_factory.mktemp("near-1e5")
    model = write_checkpoint(directory, 20000.0)
    return directory, model


def test_the_residual_scale_is_the_routing_factor_in_float16_only(near_1e5):
    config = moetrt.load_config(near_1e5[0])
    assert residual_scale(config, torch.float16) == SCALE
    assert residual_scale(config, torch.float32) == residual_scale(config, torch.bfloat16) == 1.0


def test_float16_build_keeps_a_1e5_residual_finite_and_matches_float32(near_1e5, tmp_path):
    directory, model = near_1e5
    peak = residual_peak(model)
    assert FP16_MAX < peak < SCALE * FP16_MAX, peak
    with torch.no_grad():  # transformers overflows in float16 too: the fault was moetrt's silence
        assert not torch.isfinite(model.half()(torch.from_numpy(IDS)).logits).all()
    engine_dir = build_engine(directory, tmp_path / "fp16", backend="ort", dtype="float16", profile=PROFILE)
    got = Engine.load(engine_dir).logits(IDS)
    with torch.no_grad():
        want = moetrt.load_reference(directory)(torch.from_numpy(IDS)).numpy()
    atol, rtol, _ = TOLERANCES["float16"]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= atol + rtol * np.abs(want).max()


def test_float16_without_the_residual_scale_is_refused(near_1e5, tmp_path, monkeypatch):
    monkeypatch.setattr("moetrt.export.model.residual_scale", lambda config, dtype: 1.0)
    with pytest.raises(MoetrtError) as refused:
        build_engine(near_1e5[0], tmp_path / "fp16", backend="ort", dtype="float16", profile=PROFILE)
    # ONNX Runtime's fused add + norm sums in fp32, so the overflow shows one layer on: layer 2, not 1
    assert re.fullmatch(r"the float16 engine overflows on 4 calibration prompts: the residual stream has overflowed "
                        r"by the end of model\.layers\.2 and \d+ of 12288 logits are NaN or inf \(float16 holds "
                        r"magnitudes up to 65504\); build it in float32 \(--dtype float32\)", str(refused.value))
    assert list(tmp_path.iterdir()) == []  # staged: nothing half-written


# slow (a float32 and a float16 build, ~35 s); an overflow refusal is tested above in `make test`
@pytest.mark.slow
def test_float16_beyond_the_scaled_range_is_refused_and_a_rebuild_keeps_the_old_engine(tmp_path):
    model = write_checkpoint(tmp_path / "ckpt", 1e6)
    assert residual_peak(model) > SCALE * FP16_MAX  # out of reach of the scaling: float16 cannot hold it
    old = build_engine(tmp_path / "ckpt", tmp_path / "engine", backend="ort", profile=PROFILE)  # float32 builds
    before = (old / "manifest.json").read_text()
    with pytest.raises(MoetrtError, match=r"^the float16 engine overflows on 4 calibration prompts: the residual "
                                          r"stream has overflowed by the end of model\.layers\.1 and \d+ of 12288 "
                                          r"logits are NaN or inf .*; build it in float32 \(--dtype float32\)$"):
        build_engine(tmp_path / "ckpt", tmp_path / "engine", backend="ort", dtype="float16", profile=PROFILE)
    assert (old / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "engine"]


def test_bfloat16_on_the_cpu_provider_is_refused_before_any_export(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "v3-qlora-grouped-yarn")
    real_export = moetrt.export_onnx

    def no_export(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr("moetrt.export.ort.plan.ort_provider", lambda: "CPUExecutionProvider")
    monkeypatch.setattr("moetrt.export.onnx_export.export_onnx", no_export)
    message = ("ONNX Runtime engines run float32 or float16 here, not bfloat16 (its CPU provider has no bfloat16 "
               "kernels); build with --dtype float32 or --dtype float16, or with --backend trt on a GPU")
    with pytest.raises(MoetrtError) as refused:
        build_engine(checkpoint, tmp_path / "engine", backend="ort", dtype="bfloat16")
    assert str(refused.value) == message
    monkeypatch.setattr("moetrt.export.onnx_export.export_onnx", real_export)
    with pytest.raises(MoetrtError) as refused:
        moetrt.export_onnx(checkpoint, tmp_path / "export", target="ort", dtype="bfloat16")
    assert str(refused.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
