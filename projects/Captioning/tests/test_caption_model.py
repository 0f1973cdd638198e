"""FIBERCaption on the tiny Demo model: causal forward, cached decoding, checkpoint layout."""

import copy
import re
from pathlib import Path

import pytest
import torch
from captioning import add_captioning_config, mle_loss, next_token_labels, sequence_logprob
from captioning import model as caption_module
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fiber_d2.checkpoint.convert import convert_caption_state_dict
from fiber_d2.engine.setup import ConfigError, load_config

PROJECT = Path(__file__).resolve().parents[1]
SHAPES_CFG = str(PROJECT / "configs" / "shapes_mle.yaml")


def caption_cfg(*opts):
    return load_config(
        SHAPES_CFG, ["MODEL.DEVICE", "cpu", *opts], extra_defaults=(add_captioning_config,)
    )


@pytest.fixture(scope="module")
def caption_model():
    torch.manual_seed(0)
    model = build_model(caption_cfg("CAPTION.MAX_LENGTH", "12")).eval()
    # non-zero gates and a sharper head, so cross-attention and every layer matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha_t2i"):
                p.fill_(0.7)
            if "crossattention_t2i.output.dense.weight" in name:
                p.mul_(30)
        model.mlm_score.decoder.weight.mul_(20)
    return model


def test_a_caption_longer_than_the_text_tower_is_a_config_error():
    """One line from the CLI (ConfigError), naming the key, not a traceback."""
    positions = caption_cfg().MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    with pytest.raises(ConfigError, match=f"CAPTION.MAX_LENGTH {positions + 1} exceeds the text"):
        build_model(caption_cfg("CAPTION.MAX_LENGTH", str(positions + 1)))
    with pytest.raises(ConfigError, match="CAPTION.DECODING must be one of"):
        caption_module.FIBERCaption(
            **{**caption_module.FIBERCaption.from_config(caption_cfg()), "decoding": "nope"}
        )


def test_causal_forward_ignores_later_tokens(caption_model):
    images = torch.randn(2, 3, 128, 128)
    ids = torch.randint(5, 900, (2, 9))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    logits = caption_model.forward_caption(images, ids, mask)
    changed = ids.clone()
    changed[:, 6:] = torch.randint(5, 900, (2, 3))
    logits2 = caption_model.forward_caption(images, changed, mask)
    assert torch.allclose(logits[:, :6], logits2[:, :6], atol=1e-5)
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:], atol=1e-3)
    # the image matters (the fused layers cross-attend)
    logits3 = caption_model.forward_caption(torch.randn(2, 3, 128, 128), ids, mask)
    assert not torch.allclose(logits, logits3, atol=1e-3)


def test_cached_steps_equal_reencoding(caption_model):
    images = torch.randn(3, 3, 128, 128)
    tokens = caption_model.encode_image(images)
    ids = torch.randint(5, 900, (3, 7))
    ids[:, 0] = 0
    full, _ = caption_model.text_logits(ids, None, tokens)
    cache, steps = None, []
    for t in range(ids.shape[1]):
        new = ids[:, : t + 1] if cache is None else ids[:, t : t + 1]
        logits, cache = caption_model.text_logits(
            new, None, tokens if cache is None else None, cache
        )
        steps.append(logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("decoding", ["beam", "greedy"])
def test_cached_decoding_gives_the_same_captions(caption_model, decoding):
    pictures = [torch.zeros(3, 128, 128), torch.full((3, 128, 128), 255.0)]
    pictures.append(torch.randint(0, 255, (3, 128, 128)).float())
    pictures[0][:, :64] = 255  # half white, half black
    images = caption_model.images([{"image": p.to(torch.uint8)} for p in pictures])
    cached = caption_model.generate(images, decoding=decoding, use_cache=True)
    reencoded = caption_model.generate(images, decoding=decoding, use_cache=False)
    assert torch.equal(cached, reencoded)
    assert cached.shape[1] <= caption_model.max_length
    assert len(set(map(tuple, cached.tolist()))) > 1  # not a degenerate constant output


# --------------------------------------------------------------------- released caption layout
def _image_rest(rest):
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", rest)
    return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else rest


def caption_original_key(key):
    """FIBERCaption key -> original caption-checkpoint key (coarse spec §6.2), written from the spec."""
    if key.startswith("backbone.image_tower."):
        return "vit_model." + _image_rest(key[len("backbone.image_tower.") :])
    if key.startswith("image_norm."):
        return "vit_model.norm." + key[len("image_norm.") :]
    if key.startswith("backbone.text_tower.model."):
        return "text_transformer." + key[len("backbone.text_tower.model.") :]
    return key  # cross_modal_* (adapters included), mlm_score


def test_released_caption_layout_converts_and_loads(caption_model, tmp_path):
    from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer

    state = caption_model.state_dict()
    g = torch.Generator().manual_seed(5)
    original = {}
    for k, v in state.items():
        original[caption_original_key(k)] = (
            torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        )
    # what the original caption model also carries: buffers, the unused pooler / cross LN and
    # alpha_t2i of unfused layers
    original["text_transformer.embeddings.position_ids"] = torch.arange(66)[None]
    original["text_transformer.pooler.dense.weight"] = torch.randn(64, 64)
    original["text_transformer.pooler.dense.bias"] = torch.randn(64)
    original["text_transformer.encoder.layer.0.alpha_t2i"] = torch.zeros(1)
    original["text_transformer.encoder.layer.3.crossattention_t2i.output.LayerNorm.weight"] = (
        torch.ones(64)
    )
    adapters = [k for k in original if k.startswith("cross_modal_att_layers.")]
    assert sorted(adapters) == [
        f"cross_modal_att_layers.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")
    ]
    converted, report = convert_caption_state_dict(
        {"state_dict": original, "epoch": 9}, model_state=state
    )
    assert report.missing_in_checkpoint == [] and report.shape_mismatches == []
    assert {r for _, r in report.skipped} <= {"recomputed buffer", "unused by the original model"}
    path = tmp_path / "caption.pth"
    torch.save({"model": converted}, path)
    model = copy.deepcopy(caption_model)
    seen = []
    checkpointer = FIBERCheckpointer(model)
    checkpointer._log_incompatible_keys = seen.append
    checkpointer.load(str(path))
    assert seen[0].missing_keys == [] and seen[0].unexpected_keys == []
    loaded = model.state_dict()
    for k in state:
        if k in converted:
            assert torch.equal(loaded[k], original[caption_original_key(k)]), k
    assert torch.equal(
        loaded["cross_modal_att_layers.1.weight"], original["cross_modal_att_layers.1.weight"]
    )


def test_a_coarse_checkpoint_starts_the_caption_stage(tmp_path):
    """The shapes MLE stage starts from the Demo coarse checkpoint (``make demo-vl``): the caption
    model's own adapters (``cross_modal_att_layers``, absent from any pre-training checkpoint) are
    its stage head, not a partial load; anything else missing still fails."""
    from fiber_d2.checkpoint import CheckpointError, FIBERCheckpointer

    coarse = build_model(load_config(str(PROJECT.parents[1] / "configs/Demo/coarse_tiny.yaml")))
    path = tmp_path / "coarse.pth"
    torch.save({"model": coarse.state_dict()}, path)
    model = build_model(caption_cfg())
    assert any(k.startswith("cross_modal_att_layers.") for k in model.state_dict())
    FIBERCheckpointer(model).load(str(path))
    key = "backbone.text_tower.model.embeddings.word_embeddings.weight"
    assert torch.equal(model.state_dict()[key], coarse.state_dict()[key])
    broken = {k: v for k, v in coarse.state_dict().items() if ".encoder.layer.3." not in k}
    torch.save({"model": broken}, path)
    with pytest.raises(CheckpointError, match=r"backbone.text_tower\(25\)"):
        FIBERCheckpointer(build_model(caption_cfg())).load(str(path))


def test_feature_cache_gives_the_uncached_mle_loss_and_gradients():
    """MODEL.COARSE.FEATURE_CACHE keeps the frozen image tower's raw tokens per image; the MLE loss
    and the gradients of what trains (text tower, adapters, heads) equal the uncached ones."""
    models = []
    for cache in ("False", "True"):
        torch.manual_seed(0)
        models.append(build_model(caption_cfg("MODEL.COARSE.FEATURE_CACHE", cache)).train())
    plain, cached = models
    with torch.no_grad():  # open the gates so that the image reaches the loss
        for m in models:
            for name, p in m.named_parameters():
                if name.endswith("alpha_t2i"):
                    p.fill_(0.7)
    g = torch.Generator().manual_seed(2)
    records = []
    for _ in range(3):
        ids = torch.randint(5, 900, (12,), generator=g)
        ids[0] = 0
        image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g)
        records.append({"image": image, "input_ids": ids, "attention_mask": torch.ones(12).long()})
    records.append({**records[0], "input_ids": records[1]["input_ids"]})  # image 0 again
    calls, forward_image = [], cached.backbone.forward_image

    def counted(images):
        calls.append(images.shape[0])
        return forward_image(images)

    cached.backbone.forward_image = counted
    expected = plain(records)["loss_caption_mle"]
    expected.backward()
    for _ in range(2):  # filling the cache, then reading it only
        loss = cached(records)["loss_caption_mle"]
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
        loss.backward()
    assert calls == [3] and len(cached.feature_cache) == 3
    # a batch whose new image is not its first: the image tower runs for that one alone
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g)
    batch = [records[1], {**records[2], "image": image}]
    with torch.no_grad():
        torch.testing.assert_close(
            cached(batch)["loss_caption_mle"], plain(batch)["loss_caption_mle"], rtol=0, atol=1e-6
        )
    assert calls == [3, 1] and len(cached.feature_cache) == 4
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert any(n.startswith("cross_modal_att_layers.") for n in grads)
    assert any(n.startswith("backbone.text_tower.") for n in grads)
    assert not any(n.startswith("backbone.image_tower.") for n in grads)
    for name, p in cached.named_parameters():
        if name in grads:
            # at 1e-5 of the largest entry; the key biases' gradients are rounding noise (the
            # softmax ignores them), hence the small floor
            scale = float(grads[name].abs().max())
            torch.testing.assert_close(p.grad / 2, grads[name], rtol=0, atol=1e-5 * scale + 1e-8)
        else:
            assert p.grad is None, name


def test_feature_cache_needs_a_frozen_image_tower_and_serves_the_mle_stage(caplog):
    with pytest.raises(ValueError, match="frozen backbone.image_tower .MODEL.SWIN.FREEZE_AT 4"):
        build_model(caption_cfg("MODEL.COARSE.FEATURE_CACHE", "True", "MODEL.SWIN.FREEZE_AT", "2"))
    assert build_model(caption_cfg("MODEL.COARSE.FEATURE_CACHE", "True")).feature_cache == {}
    gold = build_model(caption_cfg("MODEL.COARSE.FEATURE_CACHE", "True", "CAPTION.STAGE", "gold"))
    assert gold.feature_cache is None
    assert "serves CAPTION.STAGE 'mle' only; the 'gold' stage" in caplog.text


def test_cider_sampling_reencodes_the_prefix_at_every_step(monkeypatch):
    """The original samples in train mode and re-encodes the prefix at every step, so each step
    draws its own dropout masks; the key/value cache (CAPTION.USE_CACHE) serves decoding only."""
    model = build_model(caption_cfg("CAPTION.STAGE", "cider")).train()
    asked = []

    class Stop(Exception):
        pass

    def spy(image_tokens, use_cache=None):
        asked.append(use_cache)
        raise Stop

    monkeypatch.setattr(model, "decoder", spy)
    assert model.use_cache
    with pytest.raises(Stop):
        model._cider([{"references": ["a red circle"]}], torch.randn(1, 3, 128, 128), *[None] * 3)
    assert asked == [False]


class _RecordingCider:
    """A CIDEr-D stand-in: the rewards it is given, and the references it was asked with."""

    def __init__(self, rewards):
        self.rewards, self.asked = rewards, None

    def scores(self, candidates, references):
        self.asked = (list(candidates), [list(r) for r in references])
        return list(self.rewards)


def test_cider_stage_mixes_mle_and_reinforce_against_each_samples_own_image(monkeypatch):
    """CIDEr stage (coarse spec §5.6): samples of image b are scored against the references of
    image b and re-scored on image b; total = alpha * L_mle + (1 - alpha) * L_rl with
    L_rl = sum_i r_i * (100 - 100 * s_i) / B_images."""
    torch.manual_seed(0)
    opts = ["CAPTION.STAGE", "cider", "CAPTION.CIDER_SAMPLES", "2", "CAPTION.CIDER_ALPHA", "0.25"]
    model = build_model(caption_cfg(*opts)).eval()
    with torch.no_grad():  # non-zero gates and sharper cross-attention: the image matters
        for name, p in model.named_parameters():
            if name.endswith("alpha_t2i"):
                p.fill_(0.7)
            if "crossattention_t2i.output.dense.weight" in name:
                p.mul_(30)
    bos, eos, pad = model.bos, model.eos, model.pad
    # two images, two samples each: rows 0-1 belong to image 0, rows 2-3 to image 1
    samples = torch.tensor(
        [[bos, 11, 12, eos, pad], [bos, 13, eos, pad, pad], [bos, 14, 15, 16, eos],
         [bos, 17, eos, pad, pad]]
    )  # fmt: skip
    monkeypatch.setattr(caption_module, "sample_captions", lambda *a, **k: samples.clone())
    rewards = [1.5, 0.25, 1.0, 0.0]
    model.cider = _RecordingCider(rewards)
    refs = [["a red circle", "one red circle"], ["two blue squares"]]
    images = torch.randn(2, 3, 128, 128)
    ids = torch.tensor([[bos, 21, 22, eos, pad], [bos, 23, eos, pad, pad]])
    mask = (ids != pad).long()
    labels = next_token_labels(ids, pad)
    with EventStorage(0), torch.no_grad():
        out = model._cider([{"references": r} for r in refs], images, ids, mask, labels)
        mle = mle_loss(model.forward_caption(images, ids, mask), labels)
        rl = 0.0
        for i, reward in enumerate(rewards):
            row = samples[i : i + 1]
            own_image = images[i // 2 : i // 2 + 1]
            logits = model.forward_caption(own_image, row, (row != pad).long())
            r_i = sequence_logprob(logits, next_token_labels(row, pad))[0]
            rl += r_i * (100.0 - 100.0 * reward)
        rl /= 2  # images, not samples
    assert model.cider.asked[1] == [refs[0], refs[0], refs[1], refs[1]]
    assert out["loss_caption_mle"].item() == pytest.approx(0.25 * mle.item(), rel=1e-5)
    assert out["loss_caption_rl"].item() == pytest.approx(0.75 * float(rl), rel=1e-4)


def test_gold_snapshot_is_a_frozen_eval_copy_renewed_every_update_period():
    """GOLD (coarse spec §5.6): a frozen eval-mode copy of the model, taken at the first step and
    then every CAPTION.GOLD_UPDATE_PERIOD iterations, not at the iterations in between."""
    torch.manual_seed(0)
    model = build_model(
        caption_cfg("CAPTION.STAGE", "gold", "CAPTION.GOLD_UPDATE_PERIOD", "3")
    ).train()
    bos, eos, pad = model.bos, model.eos, model.pad
    images = torch.randn(1, 3, 128, 128)
    ids = torch.tensor([[bos, 21, 22, eos, pad]])
    mask = (ids != pad).long()
    labels = next_token_labels(ids, pad)
    taken = []
    with EventStorage(0) as storage:
        for it in range(7):
            storage.iter = it
            model._gold(images, ids, mask, labels)
            taken.append(model._snapshot_iter)
            frozen = model._snapshot[0]
            assert not frozen.training
            assert not any(p.requires_grad for p in frozen.parameters())
    assert taken == [0, 0, 0, 3, 3, 3, 6]


def test_decoded_captions_drop_special_tokens(caption_model):
    tok = caption_model.tokenizer
    words = tok("a red circle", add_special_tokens=False)["input_ids"]
    bos, eos, pad = caption_model.bos, caption_model.eos, caption_model.pad
    ids = torch.tensor([[bos, *words, eos, pad, pad], [bos, *words, words[-1], eos, pad]])
    assert caption_model.decode_text(ids) == ["a red circle", "a red circle circle"]
