"""Checkpoint loading: shards, FP8 block weights, the MTP layer, pickle refusal, and one error for bad tensors."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetrt
from moetrt import MoetrtError
from moetrt.export.checkpoint import find_weight_files
from tests.checkpoints import build_model, make_checkpoint

NAME = "v3-qlora-grouped-yarn"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("single"), NAME)


def _rewrite(directory, mutate):
    """Apply `mutate(tensors)` to a single-file checkpoint in place."""
    tensors = load_file(directory / "model.safetensors")
    mutate(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _copy(single, tmp_path):
    for file in single.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def test_sharded_checkpoint_loads_like_single_file(single, tmp_path):
    build_model(NAME).save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(moetrt.load_reference(tmp_path)(ids), moetrt.load_reference(single)(ids))


def test_bfloat16_load_keeps_router_fp32(single):
    model = moetrt.load_reference(single, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.inv_freq.dtype == torch.float32


def _quantise_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantisation: per 128x128 block, scale = amax / 448, stored as scale_inv."""
    out_features, in_features = weight.shape
    rows, cols = math.ceil(out_features / block), math.ceil(in_features / block)
    scale = torch.empty(rows, cols)
    quantised = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            tile = weight[r * block : (r + 1) * block, c * block : (c + 1) * block].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[r, c] = s
            quantised[r * block : (r + 1) * block, c * block : (c + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return quantised, scale


def test_fp8_block_checkpoint_loads_within_quantisation_error(tmp_path):
    """bf16 checkpoint -> FP8 e4m3 with 128x128 scales (test-written) -> load: equals its own dequantisation."""
    overrides = dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=136)
    original = build_model(NAME, **overrides).to(torch.bfloat16)
    original.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    dequantised = {}
    fp8_parts = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "_proj.weight")
    for name in list(tensors):
        if name.startswith("model.layers.") and name.endswith("proj.weight") and any(p in name for p in fp8_parts):
            q, s = _quantise_fp8(tensors[name])
            tensors[name], tensors[name + "_scale_inv"] = q, s
            rows = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
            dequantised[name] = q.float() * rows
    assert any(t.shape[0] > 128 and t.dtype == torch.float8_e4m3fn for t in tensors.values())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = moetrt.load_reference(tmp_path)
    # The independent expectation: transformers running the test's own dequantised weights.
    expected = build_model(NAME, **overrides)
    state = {k: v.float() for k, v in original.state_dict().items()}
    per_expert = {k: v for k, v in dequantised.items() if ".experts." in k}
    for name, weight in dequantised.items():
        if name in state:
            state[name] = weight
    for layer in range(1, 3):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([per_expert[f"{prefix}{e}.gate_proj.weight"], per_expert[f"{prefix}{e}.up_proj.weight"]])
                   for e in range(8)]
        state[prefix + "gate_up_proj"] = torch.stack(gate_up)
        state[prefix + "down_proj"] = torch.stack([per_expert[f"{prefix}{e}.down_proj.weight"] for e in range(8)])
    expected.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert (loaded(ids) - expected(ids).logits).abs().max() <= 2e-4
    # Every loaded weight lies within e4m3 rounding of the bf16 original: half an ulp (2^-4 relative) or,
    # for values below the normal range, half the smallest subnormal step (2^-10) times the block scale.
    loaded_state = loaded.state_dict()
    original_state = {k: v.float() for k, v in original.state_dict().items()}
    for name in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 "model.layers.2.mlp.experts.gate_up_proj"):
        got, want = loaded_state[name], original_state[name]
        block_scale = want.abs().amax() / 448
        assert ((got - want).abs() <= want.abs() * 2**-4 + block_scale * 2**-10 + 1e-7).all(), name
        assert not torch.equal(got, want)


def test_mtp_layer_is_skipped_and_said(single, tmp_path, capsys, monkeypatch):
    directory = _copy(single, tmp_path)
    _rewrite(directory, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(48, 96),
                                             "model.layers.3.enorm.weight": torch.zeros(48)}))
    monkeypatch.setenv("MOETRT_QUIET", "0")
    moetrt.load_reference(directory)
    assert "skipping 2 tensors of the multi-token-prediction layer (model.layers.3)" in capsys.readouterr().err


def test_bad_tensors_are_listed_in_one_error(single, tmp_path):
    directory = _copy(single, tmp_path)

    def damage(tensors):
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
        del tensors["model.norm.weight"]
        tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        tensors["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(48, 41)

    _rewrite(directory, damage)
    with pytest.raises(MoetrtError) as error:
        moetrt.load_reference(directory)
    message = str(error.value)
    assert "\n" not in message
    for part in ("missing: model.layers.1.mlp.experts.3.up_proj.weight, model.norm.weight",
                 "unexpected: model.layers.0.self_attn.extra.weight",
                 "wrong shape: model.layers.2.self_attn.o_proj.weight [48, 41] (expected [48, 40])"):
        assert part in message


def test_pickle_checkpoints_are_refused(single, tmp_path):
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MoetrtError, match="pickle .*pytorch_model.bin.*arbitrary code"):
        moetrt.load_reference(tmp_path)


def test_index_naming_pickle_shards_is_refused(single, tmp_path):
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    with pytest.raises(MoetrtError, match="safetensors only"):
        find_weight_files(tmp_path)


def test_truncated_shard_is_a_clear_error(single, tmp_path):
    directory = _copy(single, tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoetrtError, match="outside the file or has the wrong size"):
        moetrt.load_reference(directory)


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import moetrt.export.checkpoint as checkpoint
    from moetrt.config import load_config

    # Warm up torch's one-time costs (meta-device machinery, ~150 MB of code and tables) outside the window.
    with torch.device("meta"):
        checkpoint.DeepseekForCausalLM(load_config(sys.argv[1]))

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark, so import-time peaks do not count
    base = status("VmRSS")
    model = checkpoint.load_reference(sys.argv[1])
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(status("VmHWM") - base, weights)
    """
)


def test_sharded_load_peak_memory_is_near_one_copy(tmp_path):
    """~330 MB of fp32 weights in 11 shards: loading adds at most 1.15x the weight bytes to peak RSS."""
    overrides = dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, n_routed_experts=32,
                     num_hidden_layers=4, vocab_size=2048)
    build_model(NAME, **overrides).save_pretrained(tmp_path, max_shard_size="20MB")
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    added, weights = map(int, result.stdout.split())
    print(f"peak RSS added {added / 1e6:.1f} MB for {weights / 1e6:.1f} MB of weights ({added / weights:.2f}x)")
    assert weights > 300e6
    assert added <= 1.15 * weights


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_a_quantized_head_lets_its_source_rows_go_as_it_goes(tmp_path, monkeypatch):
    """A quantizing module reports each chunk of rows done, and the shard drops those rows' mapped pages: the
    bf16 source of a 160k-vocabulary head (0.67 GB) never sits whole in memory beside its quantized copy."""
    from moetrt.export import quantized
    from moetrt.export.checkpoint import SafetensorsFile
    from moetrt.export.quantized import QuantizedLinear
    from moetrt.quantization import QuantScheme

    monkeypatch.setattr(quantized, "ROWS_PER_STEP_ELEMENTS", 1 << 21)  # chunks of 2048 rows: 4 MB of bf16

    path = tmp_path / "head.safetensors"
    save_file({"lm_head.weight": torch.randn(16384, 1024).to(torch.bfloat16)}, str(path))  # 32 MB
    shard = SafetensorsFile(path)
    weight = shard.view("lm_head.weight")
    float(weight.float().sum())  # every page read
    assert _mapped_kb(path) > 30_000
    shard.release("lm_head.weight", slice(0, 8192))
    assert 14_000 < _mapped_kb(path) < 18_000  # the first half gone, the second resident
    shard.release("lm_head.weight")
    assert _mapped_kb(path) < 100

    head, rows_done, peak = QuantizedLinear(1024, 16384, QuantScheme(4)), [], [0]

    def done(rows: slice) -> None:
        rows_done.append(rows)
        peak[0] = max(peak[0], _mapped_kb(path))  # the chunk just quantized is resident, the ones before are not
        shard.release("lm_head.weight", rows)

    head.load_weight(shard.view("lm_head.weight"), done)
    assert rows_done[0].start == 0 and rows_done[-1].stop == 16384 and len(rows_done) == 8
    assert all(a.stop == b.start for a, b in zip(rows_done, rows_done[1:]))
    assert peak[0] < 10_000 and _mapped_kb(path) < 100  # a chunk (4 MB) and read-ahead at a time, not 32 MB
    shard.close()
