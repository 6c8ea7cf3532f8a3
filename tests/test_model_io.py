"""Hugging Face directory round trips and bad-input errors of the model files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ringrt
from ringrt.model.config import ModelConfig
from ringrt.model.hf import save_pretrained
from ringrt.model.llama import Llama

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=101, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=1000.0)


def _model(tie: bool) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(**CFG, tie_embeddings=tie)).double()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tie", [True, False])
def test_save_then_transformers_and_ringrt_load_the_same_model(tmp_path, tie):
    m = _model(tie)
    save_pretrained(m, tmp_path)
    x = torch.randint(0, 101, (2, 24))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).double()
    assert torch.allclose(hf(x).logits, m(x), atol=1e-12, rtol=0)
    back = ringrt.load_pretrained(tmp_path, dtype=torch.float64)
    assert torch.equal(back(x), m(x))
    assert back.config.tie_embeddings == tie and back.config.rope_theta == 1000.0
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left


@pytest.mark.timeout(60)
def test_bad_checkpoints_raise_value_errors_naming_the_problem(tmp_path):
    good = tmp_path / "good"
    save_pretrained(_model(True), good)
    with pytest.raises(ValueError, match="not a directory"):
        ringrt.load_pretrained(tmp_path / "nope")

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(good):
            (d / f).write_bytes((good / f).read_bytes())
        edit(d)
        return d

    cases = {
        "no_config": (lambda d: os.unlink(d / "config.json"), "config.json is missing"),
        "no_weights": (lambda d: os.unlink(d / "model.safetensors"), "model.safetensors is missing"),
        "bad_json": (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
                      "not a readable safetensors"),
        "wrong_dim": (lambda d: _edit_json(d, hidden_size=64, head_dim=16), "has shape"),
        "more_layers": (lambda d: _edit_json(d, num_hidden_layers=3), "missing"),
        "scaling": (lambda d: _edit_json(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}), "rope_type"),
        "not_llama": (lambda d: _edit_json(d, model_type="mistral"), r"model_type=.mistral. is not supported by ringrt.s Llama.*ringrt\.hf"),
    }
    for name, (edit, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            ringrt.load_pretrained(variant(name, edit))


def _edit_json(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.timeout(60)
def test_interrupted_save_keeps_the_previous_files(tmp_path, monkeypatch):
    save_pretrained(_model(True), tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("ringrt.model.hf.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(_model(False), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_model_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide model.n_heads=4"):
        Llama(ModelConfig(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="model.dim=100 must be a multiple of model.n_heads=3"):
        Llama(ModelConfig(dim=100, n_heads=3))
