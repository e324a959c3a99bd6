"""bf16 on the CPU: the torch engine (engines.FastSegVLM, load_model) takes bf16 autocast exactly where torch reports
native bf16 (AVX512-BF16 or AMX) and float32 elsewhere or when asked; evaluate.py stays float32 unless asked;
and on a small trained model bf16 masks agree with float32's."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tooling import save_model_checkpoint
from torch.utils.data import DataLoader

import evaluate
from data import PhraseCutLMDB, collate
from helpers import engines, inference
from model import SegVLM, build_model


def pretend_cpu(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_model_checkpoint(build_model("smoke"), tmp_path_factory.mktemp("bf16") / "best.pth")


def test_without_native_bf16_the_torch_engine_stays_float32(ckpt, monkeypatch):
    pretend_cpu(monkeypatch, avx512_bf16=False, amx=False)
    assert not engines.native_bf16() and not engines.amp_for("cpu")
    model = inference.load_model(ckpt, "cpu", engine="torch")
    assert isinstance(model, engines.FastSegVLM) and model.dtype is None and model.precision == "fp32"
    forced = inference.load_model(ckpt, "cpu", engine="torch", precision="bf16")  # asked for: emulated, but done
    assert isinstance(forced, engines.FastSegVLM) and forced.dtype == torch.bfloat16
    assert engines.amp_for("cuda") and engines.amp_for("cuda", "auto")  # the GPU's choice is its own
    with pytest.raises(ValueError, match="precision must be one of"):
        inference.load_model(ckpt, "cpu", precision="fp16")


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True)])
def test_with_native_bf16_the_torch_engine_runs_bf16_autocast(ckpt, monkeypatch, avx512_bf16, amx):
    pretend_cpu(monkeypatch, avx512_bf16, amx)
    assert engines.native_bf16() and engines.amp_for("cpu") and not engines.amp_for("cpu", "fp32")
    fast = inference.load_model(ckpt, "cpu", engine="torch")
    assert isinstance(fast, engines.FastSegVLM) and fast.dtype == torch.bfloat16 and not fast.cuda_graphs
    assert fast.precision == "bf16" and fast.channels_last
    assert type(inference.load_model(ckpt, "cpu", engine="eager", precision="fp32")) is SegVLM
    image, tokens = torch.randn(2, 3, 64, 64), torch.tensor([[49406, 320, 49407], [49406, 530, 49407]])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = fast.model(image.contiguous(memory_format=torch.channels_last), tokens).float()
        assert torch.equal(fast(image, tokens), ref)  # the model under bf16 autocast, channels-last, nothing else
        plain = inference.load_model(ckpt, "cpu", engine="eager", precision="fp32")
        assert not torch.equal(plain(image, tokens), ref)  # which is not float32's


def test_the_eager_engine_honours_bf16_when_asked(ckpt):
    """--engine eager --precision bf16 (the old --no-fast --precision bf16) runs bf16, not float32 in silence."""
    eager = inference.load_model(ckpt, "cpu", engine="eager", precision="bf16")
    plain = inference.load_model(ckpt, "cpu", engine="eager", precision="fp32")
    assert eager.precision == "bf16" and plain.precision == "fp32"
    image, tokens = torch.randn(2, 3, 64, 64), torch.tensor([[49406, 320, 49407], [49406, 530, 49407]])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = plain(image, tokens).float()
        assert torch.equal(eager(image, tokens), ref) and not torch.equal(plain(image, tokens), ref)
    assert type(inference.load_model(ckpt, "cpu", fast=False, precision="fp32")) is SegVLM  # the older switch


def test_evaluate_keeps_float32_unless_asked(tmp_path):
    base = ["--ckpt", str(tmp_path / "x.pth"), "--data", str(tmp_path / "d.lmdb"), "--no-progress"]
    assert not evaluate.parse_args(base).amp
    assert evaluate.parse_args(base + ["--precision", "bf16"]).amp


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.mark.slow  # ~20 s of training
def test_bf16_masks_agree_with_float32_on_a_trained_model(synth):
    _, lmdb, _ = synth
    torch.manual_seed(0)
    model = build_model("smoke")
    cfg = model.config
    train = PhraseCutLMDB(str(lmdb), input_size=cfg.input_size, word_len=cfg.word_len, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(6):
        for batch in DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate,
                                generator=torch.Generator().manual_seed(epoch)):
            logits = model(batch["image"], batch["tokens"])
            target = F.interpolate(batch["mask"], size=logits.shape[-2:], mode="nearest")
            loss = F.binary_cross_entropy_with_logits(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    plain = copy.deepcopy(model)  # the torch engine turns its model's weights channels-last
    fast = engines.FastSegVLM(model, amp=True, cuda_graphs=False)
    assert fast.dtype == torch.bfloat16
    tasks = PhraseCutLMDB(str(lmdb), input_size=cfg.input_size, word_len=cfg.word_len, train=False)
    ious, fractions, inter, union = [], [], 0, 0
    with torch.no_grad():
        for batch in DataLoader(tasks, batch_size=16, collate_fn=collate):
            pair = plain(batch["image"], batch["tokens"]), fast(batch["image"], batch["tokens"])
            for i, gt in enumerate(batch["gt_mask"]):  # the masks as predict writes them: at the image's size
                fp32, bf16 = (inference.probability_map(logits[i], *gt.shape, cfg.input_size)
                              > inference.DEFAULT_THRESHOLD for logits in pair)
                ious.append(mask_iou(fp32, bf16))
                fractions.append(fp32.mean())
                inter, union = inter + (fp32 & bf16).sum(), union + (fp32 | bf16).sum()
    assert 0.02 < np.mean(fractions) < 0.6  # it has learnt masks: neither empty nor full
    # measured here: 0.908 per task, 0.952 over all pixels; a smoke model 6 epochs in has many pixels near the
    # threshold, so the bar is lower than the 0.98 docs/measurements.md asks of a trained demo checkpoint
    assert np.mean(ious) >= 0.85 and inter / union >= 0.92, (np.mean(ious), inter / union)
