"""DeepSeek-V3's multi-token-prediction (MTP) module in the reference model and an --mtp engine, against a
reference written here from the DeepSeek-V3 technical report (arXiv:2412.19437, section 2.2, eq. 21-23) on top of
transformers' DeepseekV3 modules.

The checkpoint is the layout DeepSeek-V3 ships: a 2-layer main model whose config says num_nextn_predict_layers 1,
and the MTP module's tensors under `model.layers.2.*` (its decoder block; enorm, hnorm, eh_proj, shared_head.norm;
copies of the embedding and the head as `embed_tokens` and `shared_head.head`). The block is layer 2 of a 3-layer
transformers model, so its key names are the ones transformers writes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import moetrt
from moetrt import MoetrtError
from moetrt.export.engine import build_engine
from moetrt.settings import OrtOptions
from tests.checkpoints import build_model

NAME = "v3-qlora-grouped-yarn"  # q-LoRA, grouped routing, YaRN: positions matter; layer 2 is MoE (first_k_dense 1)
MAIN_LAYERS = 2
MTP_LAYER = f"model.layers.{MAIN_LAYERS}."
VOCAB = 96


class Reference:
    """transformers' 2-layer DeepseekV3ForCausalLM (`main`), the 3-layer one whose layer 2 is the MTP block
    (`stack`), and the MTP module's own tensors (`extra`: enorm, hnorm, eh_proj, shared_head.norm)."""

    def __init__(self, seed: int = 0):
        self.stack = build_model(NAME, seed, num_hidden_layers=MAIN_LAYERS + 1)
        self.main = build_model(NAME, seed, num_hidden_layers=MAIN_LAYERS)
        self.main.load_state_dict({k: v for k, v in self.stack.state_dict().items() if not k.startswith(MTP_LAYER)})
        hidden = self.main.config.hidden_size
        g = torch.Generator().manual_seed(seed + 100)
        self.extra = {
            "enorm.weight": 1 + 0.3 * torch.randn(hidden, generator=g),
            "hnorm.weight": 1 + 0.3 * torch.randn(hidden, generator=g),
            "eh_proj.weight": 0.1 * torch.randn(hidden, 2 * hidden, generator=g),
            "shared_head.norm.weight": 1 + 0.3 * torch.randn(hidden, generator=g),
        }
        self.eps = self.main.config.rms_norm_eps

    def write(self, directory: Path, mtp_tensors: bool = True, nextn: int = 1) -> Path:
        """The checkpoint: the main model as transformers saves it, plus (with `mtp_tensors`) the MTP layer's
        tensors, and config.json's num_nextn_predict_layers set to `nextn`."""
        self.main.save_pretrained(directory)
        if mtp_tensors:
            self.stack.save_pretrained(directory / "stack")
            tensors = load_file(directory / "model.safetensors")
            block = {k: v for k, v in load_file(directory / "stack" / "model.safetensors").items()
                     if k.startswith(MTP_LAYER)}
            assert f"{MTP_LAYER}mlp.experts.7.down_proj.weight" in block  # the MTP block is an MoE layer
            tensors.update(block)
            tensors.update({MTP_LAYER + name: value.clone() for name, value in self.extra.items()})
            tensors[MTP_LAYER + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
            tensors[MTP_LAYER + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
            save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
                      metadata={"format": "pt"})
            for path in sorted((directory / "stack").iterdir()):
                path.unlink()
            (directory / "stack").rmdir()
        config = json.loads((directory / "config.json").read_text())
        assert config["num_hidden_layers"] == MAIN_LAYERS
        config["num_nextn_predict_layers"] = nextn
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        return directory

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @torch.no_grad()
    def run(self, ids: torch.Tensor, following: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids `[B, S]`, following `[B, S]` (t_{i+1} at each i) -> main logits and draft logits `[B, S, vocab]`.

        h_i: the main model's last hidden state after its final norm (what its head reads);
        h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]) (eq. 21; the report writes the h half first, but the
        released weights' eh_proj takes the embedding half first, as SGLang's deepseek_nextn and vLLM's
        deepseek_mtp read them); h^1 = TRM(h') (eq. 22), the decoder block causal over RoPE positions 0..S-1 (the
        main model's); P_{i+2} = OutHead(shared_head.norm(h^1_i)) (eq. 23) with the main model's head."""
        batch, seq = ids.shape
        hidden = self.main.model(input_ids=ids).last_hidden_state  # [B, S, H]
        logits = self.main.lm_head(hidden)
        embedded = self.main.model.embed_tokens(following)
        combined = F.linear(torch.cat([self.rms_norm(embedded, self.extra["enorm.weight"]),
                                       self.rms_norm(hidden, self.extra["hnorm.weight"])], dim=-1),
                            self.extra["eh_proj.weight"])
        positions = torch.arange(seq)[None].expand(batch, seq)
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        mask = torch.zeros(batch, 1, seq, seq).masked_fill(future, torch.finfo(torch.float32).min)
        block = self.stack.model.layers[MAIN_LAYERS]
        out = block(combined, attention_mask=mask, position_ids=positions,
                    position_embeddings=self.stack.model.rotary_emb(combined, positions))
        draft = self.main.lm_head(self.rms_norm(out, self.extra["shared_head.norm.weight"]))
        return logits, draft


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return reference.write(tmp_path_factory.mktemp("mtp-ckpt"))


@pytest.fixture(scope="module")
def ours(checkpoint):
    return moetrt.load_reference(checkpoint, mtp=True)


def sequences(batch: int = 2, seq: int = 14, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def shifted(ids: torch.Tensor, last) -> torch.Tensor:
    """t_{i+1} beside each position: ids moved left one, `last` (an int or a `[B]` tensor) at the end."""
    following = torch.empty_like(ids)
    following[:, :-1] = ids[:, 1:]
    following[:, -1] = last
    return following


def speculative(model, ids: torch.Tensor, following: torch.Tensor):
    """`speculative_step` over whole sequences from empty caches, the MTP module on the first M positions (M: the
    width of `following`); logits at every position, drafts at the M."""
    batch, seq = ids.shape
    steps = following.shape[1]
    positions = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        return model.speculative_step(ids, positions, torch.ones(batch, seq, dtype=torch.int64),
                                      model.empty_cache(batch), positions, following,
                                      torch.ones(batch, steps, dtype=torch.int64), model.empty_cache(batch)[0],
                                      positions[:, :steps])


def test_checkpoint_has_the_deepseek_v3_mtp_layout(checkpoint):
    names = set(load_file(checkpoint / "model.safetensors"))
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.shared_experts.down_proj.weight", "self_attn.kv_b_proj.weight", "input_layernorm.weight"):
        assert MTP_LAYER + name in names
    assert not any(name.startswith(f"model.layers.{MAIN_LAYERS + 1}.") for name in names)


def test_main_and_draft_logits_match_the_papers_mtp_module(reference, ours):
    ids = sequences()
    following = shifted(ids, 5)
    want_logits, want_draft = reference.run(ids, following)
    logits, new_latents, mtp_rows, draft = speculative(ours, ids, following)
    assert len(ours.mtp) == 1
    assert (logits - reference.main(ids).logits).abs().max().item() <= 2e-4
    assert (logits - want_logits).abs().max().item() <= 2e-4
    assert draft.shape == want_draft.shape == (2, 14, VOCAB)
    # positions 0..S-2 read the true next token; the last read the explicit 5, as the reference's did
    assert (draft[:, :-1] - want_draft[:, :-1]).abs().max().item() <= 1e-4
    assert (draft[:, -1] - want_draft[:, -1]).abs().max().item() <= 1e-4
    assert len(new_latents) == MAIN_LAYERS and mtp_rows.shape == (14, 2, ours.config.latent_dim)
    # the draft is not the main model's prediction: the module's own weights matter
    assert (draft - logits).abs().max().item() > 0.1


def test_minus_one_reads_the_main_models_greedy_pick(ours):
    ids = sequences(seed=2)
    logits, _, rows, draft = speculative(ours, ids, shifted(ids, -1))
    picked = logits[:, -1].argmax(-1)
    want_logits, _, want_rows, want_draft = speculative(ours, ids, shifted(ids, picked))
    assert torch.equal(logits, want_logits)
    assert (draft - want_draft).abs().max().item() <= 1e-6
    assert (rows - want_rows).abs().max().item() <= 1e-6
    # and it is not just any token: another one changes the last draft
    other = speculative(ours, ids, shifted(ids, (picked + 1) % VOCAB))[3]
    assert (other[:, -1] - draft[:, -1]).abs().max().item() > 1e-3


def test_the_module_on_the_first_positions_gives_their_drafts_of_a_full_run(reference, ours):
    """M < S: the MTP module runs on the first M positions only (causal, so their drafts are the full run's);
    M = 0 skips it and leaves the main logits alone."""
    ids = sequences(seed=6)
    following = shifted(ids, 9)
    _, want_draft = reference.run(ids, following)
    full_logits = speculative(ours, ids, following)[0]
    logits, rows, mtp_rows, draft = speculative(ours, ids, following[:, :5])
    assert torch.equal(logits, full_logits) and len(rows) == MAIN_LAYERS
    assert mtp_rows.shape == (5, 2, ours.config.latent_dim) and draft.shape == (2, 5, VOCAB)
    assert (draft - want_draft[:, :5]).abs().max().item() <= 1e-4
    logits, _, mtp_rows, draft = speculative(ours, ids, following[:, :0])
    assert torch.equal(logits, full_logits) and mtp_rows.shape[0] == 0 and draft.shape == (2, 0, VOCAB)


def test_cached_steps_give_the_drafts_of_a_whole_sequence(reference, ours):
    """Prefill then decode in steps of 2 with both latent caches (the main layers' and the MTP module's): the
    drafts and logits are the reference's over the whole sequence."""
    ids = sequences(batch=1, seq=12, seed=3)
    following = shifted(ids, 7)
    want_logits, want_draft = reference.run(ids, following)
    past, mtp_past = ours.empty_cache(1), ours.empty_cache(1)[0]
    got_logits, got_draft = [], []
    with torch.no_grad():
        for start, end in [(0, 6), (6, 8), (8, 10), (10, 12)]:
            width = end - start
            logits, rows, mtp_rows, draft = ours.speculative_step(
                ids[:, start:end], torch.arange(start, end)[None], torch.ones(1, end, dtype=torch.int64), past,
                torch.arange(width)[None], following[:, start:end], torch.ones(1, end, dtype=torch.int64), mtp_past,
                torch.arange(width)[None])
            past = [torch.cat([p, r]) for p, r in zip(past, rows)]
            mtp_past = torch.cat([mtp_past, mtp_rows])
            got_logits.append(logits)
            got_draft.append(draft)
    assert (torch.cat(got_logits, 1) - want_logits).abs().max().item() <= 2e-4
    assert (torch.cat(got_draft, 1) - want_draft).abs().max().item() <= 1e-4


def test_loading_without_mtp_skips_the_module_and_matches_transformers(reference, checkpoint):
    plain = moetrt.load_reference(checkpoint)
    assert len(plain.mtp) == 0
    ids = sequences(seed=4)
    with torch.no_grad():
        assert (plain(ids) - reference.main(ids).logits).abs().max().item() <= 2e-4


def test_mtp_of_a_checkpoint_declaring_none_names_the_option(reference, tmp_path):
    directory = reference.write(tmp_path / "no-mtp", mtp_tensors=False, nextn=0)
    with pytest.raises(MoetrtError, match="--mtp"):
        moetrt.load_reference(directory, mtp=True)
    assert len(moetrt.load_reference(directory).mtp) == 0


def test_mtp_of_a_checkpoint_without_its_tensors_is_a_clear_error(reference, tmp_path):
    """transformers writes num_nextn_predict_layers 1 (its default) but never the MTP layer's tensors: such a
    checkpoint cannot draft, and the error says which tensors are missing or names the option."""
    directory = reference.write(tmp_path / "declared", mtp_tensors=False, nextn=1)
    with pytest.raises(MoetrtError, match=rf"--mtp|{MTP_LAYER.replace('.', '[.]')}"):
        moetrt.load_reference(directory, mtp=True)


def test_building_an_mtp_engine_of_a_checkpoint_without_one_fails(reference, tmp_path):
    directory = reference.write(tmp_path / "no-mtp", mtp_tensors=False, nextn=0)
    with pytest.raises(MoetrtError, match="--mtp"):
        build_engine(directory, tmp_path / "engine", backend="ort", mtp=True)
    assert not (tmp_path / "engine").exists()


@pytest.fixture(scope="module", params=["onnxruntime", "moetrt"])
def engine(request, checkpoint, tmp_path_factory):
    """The --mtp engine with the routed experts inside onnxruntime (one graph), and with moetrt's CPU kernel
    (segments; the module's are draft-only)."""
    out = tmp_path_factory.mktemp("engines") / f"mtp-{request.param}"
    slices = 1 if request.param == "moetrt" else None  # the kernel's slices are multiples of 8 rows; experts have 24
    return moetrt.Engine.load(build_engine(checkpoint, out, backend="ort", mtp=True,
                                           ort=OrtOptions(moe_kernel=request.param, expert_slices=slices)))


class CountedRuns:
    """Stands in for a segment's Graph, recording the segment's index in `ran` on each run."""

    def __init__(self, graph, index: int, ran: list[int]):
        self.graph, self.index, self.ran, self.session = graph, index, ran, graph.session

    def run(self, *args):
        self.ran.append(self.index)
        return self.graph.run(*args)


def test_the_kernel_engine_cuts_the_module_into_segments_plain_calls_skip(engine, monkeypatch):
    """With moetrt's kernel the module's nodes (those no main output reads) are the last two segments, with its
    expert layer between them; a call on which the module runs on no position does not run them, and still
    returns the main model's logits and latent rows, and empty rows for the module's layer."""
    from moetrt.cli import _engine_lines, _engine_summary
    from moetrt.runtime.ort import describe

    section = engine.manifest.section
    summary = _engine_summary(engine.manifest.directory)
    assert summary["mtp_module"] and summary["mtp_module_skipped_on_plain_steps"] == section.segmented
    if not section.segmented:
        assert "plain decoding runs its nodes on empty tensors" in "\n".join(_engine_lines(summary))
        return  # one graph: nothing to skip
    described = "\n".join(describe(engine.manifest))
    assert "4 graph segments (2 of them the MTP module's, run only on drafting steps)" in described
    assert "joined into one graph" in described and "a drafting call also runs the MTP module's 2 segments" in described
    # layer 0 is dense, layer 1 MoE: two main segments, then the module's two around its expert layer
    assert [segment.draft_only for segment in section.segments] == [False, False, True, True]
    assert "logits" in section.segments[1].outputs and "draft_ids" in section.segments[-1].outputs
    from moetrt.runtime.engine import Engine

    first = None
    for segmented in ("1", ""):  # segment by segment, then the main segments joined into one graph
        monkeypatch.setenv("MOETRT_SEGMENTED", segmented)
        session = Engine.load(engine.manifest.directory).session
        main = [index for index, segment in enumerate(session._segments) if not segment.draft_only]
        module = [index for index, segment in enumerate(session._segments) if segment.draft_only]
        assert (len(main), module) == ((2, [2, 3]) if segmented else (1, [1, 2]))
        ran: list[int] = []
        for index, segment in enumerate(session._segments):
            monkeypatch.setattr(segment, "graph", CountedRuns(segment.graph, index, ran))
        ids = sequences(batch=2, seq=5, seed=3).numpy()
        positions = np.broadcast_to(np.arange(5, dtype=np.int64), (2, 5))
        cache = session.new_cache(2, 8)
        mask = cache.attention_mask(5, np.ones((2, 5), np.int64))
        logits, rows = session.run(ids, positions, mask, positions, cache.past())
        assert ran == main and logits.shape == (2, 5, VOCAB)
        skipped = session.run_speculative(ids, positions, mask, positions, cache.past(), cache.reserve(5),
                                          *(np.zeros((2, 0), np.int64),) * 3)
        assert ran == main * 2 and skipped[1].shape == (2, 0)
        np.testing.assert_array_equal(skipped[0], logits)
        latent = session.latent_dim
        assert [row.shape for row in rows] == [(5, 2, latent)] * MAIN_LAYERS + [(0, 2, latent)]
        want, drafts = session.run_speculative(ids, positions, mask, positions, cache.past(), cache.reserve(5),
                                               np.full((2, 5), -1, np.int64),
                                               cache.draft_attention_mask(5, np.ones((2, 5), np.int64)), positions)
        assert ran == main * 3 + module
        np.testing.assert_array_equal(logits, want)  # skipping the module leaves the main model's logits as they were
        if first is None:
            first = (logits, drafts)
        else:  # the joined graph computes what the segments do
            np.testing.assert_allclose(logits, first[0], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(drafts, first[1])


def test_engine_drafts_the_reference_modules_greedy_prediction(reference, engine):
    """A prefill of 9 tokens then a 3-token step through the engine's session, each with its cache (the MTP layer
    masked by `draft_attention_mask`): logits and draft ids at every position are the reference's."""
    session = engine.session
    assert session.mtp_layers == 1
    ids = sequences(batch=2, seq=12, seed=5)
    want_logits, _ = reference.run(ids, shifted(ids, 0))
    last_pick = want_logits[:, -1].argmax(-1)
    following = shifted(ids, last_pick)  # the engine reads the main model's pick for -1
    want_logits, want_draft = reference.run(ids, following)
    engine_following = shifted(ids, -1).numpy()
    cache = session.new_cache(2, 16)
    assert cache.num_layers == MAIN_LAYERS + 1
    got_logits, got_drafts = [], []
    for start, end in [(0, 9), (9, 12)]:
        width = end - start
        mask = cache.attention_mask(width, np.ones((2, width), np.int64))
        positions = np.broadcast_to(np.arange(start, end, dtype=np.int64), (2, width))
        logit_positions = np.broadcast_to(np.arange(width, dtype=np.int64), (2, width))
        logits, drafts = session.run_speculative(ids[:, start:end].numpy(), positions, mask, logit_positions,
                                                 cache.past(), cache.reserve(width), engine_following[:, start:end],
                                                 cache.draft_attention_mask(width, np.ones((2, width), np.int64)),
                                                 logit_positions)
        cache.advance(width)
        got_logits.append(logits)
        got_drafts.append(drafts)
    logits, drafts = np.concatenate(got_logits, 1), np.concatenate(got_drafts, 1)
    want_draft = want_draft.numpy()
    assert drafts.shape == (2, 12) and drafts.dtype == np.int64
    assert np.abs(logits - want_logits.numpy()).max() <= 2e-4
    # the draft is the argmax of the reference's draft logits (a near-tie may go either way)
    chosen = np.take_along_axis(want_draft, drafts[..., None], -1)[..., 0]
    assert np.all(chosen >= want_draft.max(-1) - 1e-4)
    assert (drafts == want_draft.argmax(-1)).mean() >= 0.9


def test_engine_generates_the_plain_greedy_tokens_with_mtp_drafts(engine):
    prompt = [5, 17, 42, 8, 3, 60, 11]
    plain = engine.generate(prompt, greedy=True, max_new_tokens=12)
    drafted = engine.generate(prompt, greedy=True, speculative="mtp", max_new_tokens=12)
    assert drafted.token_ids == plain.token_ids and drafted.finish_reason == plain.finish_reason


def test_an_int4_mtp_engine_shares_one_quantized_embedding_table(checkpoint, tmp_path):
    """The --mtp graph gathers the embedding twice (tokens, and the drafts' following tokens): one packed table
    serves both Gathers (two tables of one name made the build fail)."""
    import onnx

    engine_dir = build_engine(checkpoint, tmp_path / "engine", backend="ort", mtp=True, quantize="int4",
                              group_size=16)
    model = onnx.load(str(next(engine_dir.glob("*.onnx"))), load_external_data=False)
    gathers = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 2 and gathers[0].input[0] == gathers[1].input[0]
    plain = moetrt.Engine.load(engine_dir).generate([5, 17, 42, 8], greedy=True, max_new_tokens=8)
    drafted = moetrt.Engine.load(engine_dir).generate([5, 17, 42, 8], greedy=True, speculative="mtp",
                                                      max_new_tokens=8)
    assert drafted.token_ids == plain.token_ids
