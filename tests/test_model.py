"""elms_gguf.model: the PyTorch reference forward and GGUF reading / writing."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

from elms_gguf import contract, model
from elms_gguf.contract import ContractError, Level
from elms_gguf.model import forward, load_gguf, write_gguf

TOKENS = torch.tensor([1, 5, 9, 100, 200, 30, 7, 260, 270, 3])
F64 = torch.float64


def f64(w: model.Weights) -> model.Weights:
    return {k: v.to(F64) for k, v in w.items()}


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------------- reference slicing
# An implementation of "level = physically smaller model" written independently of model.forward's views.


def sliced_model(config: model.ModelConfig, weights: model.Weights, kv: int, ff: int) -> tuple[model.ModelConfig, model.Weights]:
    """The dense model with kv KV heads (and their query groups) and ff FFN neurons in every layer."""
    g, d = config.group, config.head_dim
    out = {}
    for name, t in weights.items():
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind == "attn_q":
            t = t[: kv * g * d]
        elif kind in ("attn_k", "attn_v"):
            t = t[: kv * d]
        elif kind in ("ffn_gate", "ffn_up"):
            t = t[:ff]
        elif kind == "attn_output" and name.endswith("weight"):
            t = t[:, : kv * g * d]
        elif kind == "ffn_down" and name.endswith("weight"):
            t = t[:, :ff]
        out[name] = t.clone()
    small = model.ModelConfig(**{**config.__dict__, "n_head": kv * g, "n_head_kv": kv, "n_ff": ff})
    return small, out


def masked_model(config: model.ModelConfig, weights: model.Weights, widths) -> model.Weights:
    """Full-size weights whose dropped heads / neurons write nothing: zero attn_output / ffn_down columns."""
    out = {k: v.clone() for k, v in weights.items()}
    for il, (kv, ff) in enumerate(widths):
        out[f"blk.{il}.attn_output.weight"][:, kv * config.group * config.head_dim:] = 0
        out[f"blk.{il}.ffn_down.weight"][:, ff:] = 0
    return out


# ---------------------------------------------------------------------------------------------- config / weights


def test_tiny_config_defaults_match_the_tiny_vocabulary():
    c = model.tiny_config()
    assert (c.arch, c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.n_ff) == \
        ("llama", model.TINY_VOCAB_SIZE, 256, 4, 4, 2, 64, 512)
    q = model.tiny_config("qwen2")
    assert q.qkv_bias and not q.tied_embeddings
    assert c.dims() == contract.ModelDims(n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_embd=256)


def test_model_config_rejects_unsupported_arch():
    with pytest.raises(ContractError, match="'gpt2'"):
        model.tiny_config("gpt2")


def test_random_weights_are_deterministic_and_give_o1_logits_that_depend_on_width():
    c = model.tiny_config()
    a, b, other = model.random_weights(c, 0), model.random_weights(c, 0), model.random_weights(c, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blk.0.attn_q.weight"], other["blk.0.attn_q.weight"])
    full = forward(c, a, TOKENS)
    half = forward(c, a, TOKENS, widths=[(1, 256)] * c.n_layer)
    assert 0.5 < full.std().item() < 5
    assert (full - half).abs().mean().item() > 0.1


def test_tiny_tokenizer_kv_is_a_loadable_spm_vocab_padded_to_n_vocab():
    kv = {k: (v, t, s) for k, v, t, s in model.tiny_tokenizer_kv(300)}
    toks = kv["tokenizer.ggml.tokens"][0]
    assert kv["tokenizer.ggml.model"][0] == "llama"
    assert len(toks) == len(kv["tokenizer.ggml.scores"][0]) == len(kv["tokenizer.ggml.token_type"][0]) == 300
    assert toks[:3] == ["<unk>", "<s>", "</s>"] and toks[3] == "<0x00>" and toks[258] == "<0xFF>"
    assert set(kv["tokenizer.ggml.token_type"][0][3:259]) == {int(gguf.TokenType.BYTE)}
    assert kv["tokenizer.ggml.token_type"][2] == VT.INT32  # llama.cpp refuses any other element type
    with pytest.raises(ContractError):
        model.tiny_tokenizer_kv(10)


# ---------------------------------------------------------------------------------------------- forward


def test_rope_norm_rotates_adjacent_pairs_and_neox_rotates_halves():
    D = 8
    x = torch.zeros(1, 2, 1, D, dtype=F64)
    x[..., 0] = 1.0
    norm, neox = model.rope(x, 10000.0, neox=False), model.rope(x, 10000.0, neox=True)
    assert torch.equal(norm[0, 0], x[0, 0]) and torch.equal(neox[0, 0], x[0, 0])  # position 0: identity
    c, s = math.cos(1.0), math.sin(1.0)  # pair 0 has frequency theta^0 = 1
    assert torch.allclose(norm[0, 1, 0, :2], torch.tensor([c, s], dtype=F64))
    assert torch.allclose(neox[0, 1, 0, [0, D // 2]], torch.tensor([c, s], dtype=F64))
    assert norm[0, 1, 0, 2:].abs().max() == 0 and neox[0, 1, 0, 1:D // 2].abs().max() == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_with_full_widths_equals_widths_none(arch):
    c = model.tiny_config(arch)
    w = model.random_weights(c)
    assert torch.equal(forward(c, w, TOKENS), forward(c, w, TOKENS, widths=c.full_widths()))


def test_forward_accepts_batches_and_levels():
    c = model.tiny_config()
    w = model.random_weights(c)
    batch = forward(c, w, torch.stack([TOKENS, TOKENS.flip(0)]))
    assert batch.shape == (2, len(TOKENS), c.n_vocab)
    assert torch.allclose(batch[0], forward(c, w, TOKENS), atol=1e-5)
    lv = Level(0.5, [1] * 4, [256] * 4)
    assert torch.equal(forward(c, w, TOKENS, widths=lv), forward(c, w, TOKENS, widths=[(1, 256)] * 4))


def test_forward_is_causal():
    c = model.tiny_config()
    w = model.random_weights(c)
    a = forward(c, w, TOKENS, dtype=F64)
    b = forward(c, w, torch.cat([TOKENS[:5], TOKENS[5:].flip(0)]), dtype=F64)
    assert torch.allclose(a[:5], b[:5], atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv,ff", [(1, 256), (2, 128), (1, 512)])
def test_forward_at_widths_equals_physically_sliced_model(arch, kv, ff):
    c = model.tiny_config(arch)
    w = f64(model.random_weights(c))
    small_c, small_w = sliced_model(c, w, kv, ff)
    got = forward(c, w, TOKENS, widths=[(kv, ff)] * c.n_layer, dtype=F64)
    want = forward(small_c, small_w, TOKENS, dtype=F64)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_at_per_layer_widths_equals_masking_dropped_units(arch):
    c = model.tiny_config(arch)
    w = f64(model.random_weights(c))
    widths = [(2, 512), (1, 128), (0, 0), (1, 32)]
    got = forward(c, w, TOKENS, widths=widths, dtype=F64)
    want = forward(c, masked_model(c, w, widths), TOKENS, dtype=F64)
    assert torch.allclose(got, want, atol=1e-10)


def test_width_zero_everywhere_leaves_only_embedding_norm_and_head():
    c = model.tiny_config()
    w = f64(model.random_weights(c))
    x = w["token_embd.weight"][TOKENS]
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w["output_norm.weight"]
    got = forward(c, w, TOKENS, widths=[(0, 0)] * c.n_layer, dtype=F64)
    assert torch.allclose(got, x @ w["token_embd.weight"].T, atol=1e-10)


def test_forward_rejects_bad_widths():
    c = model.tiny_config()
    w = model.random_weights(c)
    with pytest.raises(ContractError, match="entries"):
        forward(c, w, TOKENS, widths=[(1, 256)] * 3)
    with pytest.raises(ContractError, match="layer 1"):
        forward(c, w, TOKENS, widths=[(1, 256), (3, 256), (1, 256), (1, 256)])


def _lora(c: model.ModelConfig, names, rank=4, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = model.tensor_shapes(c)[0]
    out = {}
    for n in names:
        rows, cols = shapes[n]
        out[n] = (torch.randn(rank, cols, generator=g, dtype=F64) * 0.1, torch.randn(rows, rank, generator=g, dtype=F64) * 0.1, 0.75)
    return out


LORA_NAMES = [f"blk.{il}.{k}.weight" for il in (1, 2) for k in
              ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]


@pytest.mark.parametrize("widths", [None, [(2, 512), (1, 128), (1, 256), (0, 64)]])
def test_lora_equals_merged_weights_at_any_width(widths):
    c = model.tiny_config("qwen2")
    w = f64(model.random_weights(c))
    lora = _lora(c, LORA_NAMES)
    merged = dict(w)
    for n, (A, B, s) in lora.items():
        merged[n] = w[n] + s * B @ A
    got = forward(c, w, TOKENS, widths=widths, lora=lora, dtype=F64)
    want = forward(c, merged, TOKENS, widths=widths, dtype=F64)
    assert torch.allclose(got, want, atol=1e-9)
    assert not torch.allclose(got, forward(c, w, TOKENS, widths=widths, dtype=F64), atol=1e-3)


def test_llama_with_permuted_qk_rows_equals_neox_rope_on_the_original_rows():
    """The HF->GGUF llama permutation turns NEOX rope into NORM rope (why load_hf permutes and qwen2 does not)."""
    q = model.tiny_config("qwen2", qkv_bias=False, tied_embeddings=True)
    w = f64(model.random_weights(q))
    ll = model.ModelConfig(**{**q.__dict__, "arch": "llama"})
    wl = dict(w)
    for il in range(q.n_layer):
        wl[f"blk.{il}.attn_q.weight"] = model.permute_rope_rows(w[f"blk.{il}.attn_q.weight"], q.n_head)
        wl[f"blk.{il}.attn_k.weight"] = model.permute_rope_rows(w[f"blk.{il}.attn_k.weight"], q.n_head_kv)
    assert torch.allclose(forward(q, w, TOKENS, dtype=F64), forward(ll, wl, TOKENS, dtype=F64), atol=1e-10)
    assert not torch.allclose(forward(q, w, TOKENS, dtype=F64), forward(ll, w, TOKENS, dtype=F64), atol=1e-3)


# ---------------------------------------------------------------------------------------------- GGUF I/O


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_write_then_load_f32_round_trip_is_exact(fixture, request):
    tm = request.getfixturevalue(fixture)
    config, weights, src = load_gguf(tm.path)
    for f in ("arch", "n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "qkv_bias",
              "tied_embeddings", "context_length", "rope_theta"):
        assert getattr(config, f) == getattr(tm.config, f), f
    assert config.rms_eps == pytest.approx(tm.config.rms_eps, rel=1e-6)  # stored as float32
    assert set(weights) == set(tm.weights)
    assert all(torch.equal(weights[k], tm.weights[k]) for k in weights)
    assert src.path == str(tm.path) and src.tensor_types["blk.0.attn_q.weight"] == QT.F32
    assert src.fields["tokenizer.ggml.model"] == "llama"
    assert src.field_types["tokenizer.ggml.tokens"] == (VT.ARRAY, VT.STRING)


def test_written_file_always_has_key_and_value_length(tiny_llama):
    fields = contract.reader_fields(gguf.GGUFReader(tiny_llama.path))
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 64
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.vocab_size"] == model.TINY_VOCAB_SIZE
    assert not any(contract.is_elastic_key(k) for k in fields)


@pytest.mark.parametrize("qtype,rel_tol", [(QT.Q8_0, 0.01), (QT.Q4_0, 0.2), (QT.F16, 1e-3), (QT.BF16, 0.01)])
def test_write_then_load_quantized_is_within_quantization_tolerance(tmp_path, qtype, rel_tol):
    path = tmp_path / "q.gguf"
    c, w = model.make_tiny_gguf(path, default_type=qtype)
    _, got, src = load_gguf(path)
    for name, t in w.items():
        if t.dim() == 1:
            assert src.tensor_types[name] == QT.F32 and torch.equal(got[name], t), name
        else:
            assert src.tensor_types[name] == qtype
            rel = ((got[name] - t).norm() / t.norm()).item()
            assert rel < rel_tol, (name, rel)
    assert src.fields["general.file_type"] == int(model._FILE_TYPE[qtype])


def test_types_override_default_type_per_tensor(tmp_path):
    path = tmp_path / "mixed.gguf"
    types = {"token_embd.weight": QT.Q8_0, "blk.0.ffn_down.weight": QT.Q4_1, "blk.0.attn_norm.weight": QT.Q8_0}
    model.make_tiny_gguf(path, types=types, default_type=QT.F16)
    tt = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert tt["token_embd.weight"] == QT.Q8_0 and tt["blk.0.ffn_down.weight"] == QT.Q4_1
    assert tt["blk.0.attn_norm.weight"] == QT.F32  # norms stay F32 whatever is asked
    assert tt["blk.1.ffn_down.weight"] == QT.F16


def test_k_quant_raises_pointing_to_llama_quantize_and_writes_nothing(tmp_path):
    with pytest.raises(ContractError, match="llama-quantize"):
        model.make_tiny_gguf(tmp_path / "k.gguf", default_type=QT.Q4_K)
    assert files_in(tmp_path) == []


def test_write_with_spec_round_trips_the_elastic_keys(tiny_elastic_llama_q8):
    tm = tiny_elastic_llama_q8
    fields = contract.reader_fields(gguf.GGUFReader(tm.path))
    spec = contract.read_spec(fields)
    assert spec is not None
    assert [lv.head_count_kv for lv in spec.levels] == [lv.head_count_kv for lv in tm.spec.levels]
    assert [lv.feed_forward_length for lv in spec.levels] == [lv.feed_forward_length for lv in tm.spec.levels]
    assert spec.anchors == tm.spec.anchors and spec.model_id == "tiny-test"
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.feed_forward_length"] == 512  # full width


def test_write_rejects_spec_with_columns_not_in_whole_blocks(tmp_path):
    c = model.tiny_config()
    spec = contract.ElasticSpec(levels=[contract.uniform_level(c.dims(), 0.5, 1, 100), contract.uniform_level(c.dims(), 1.0, 2, 512)])
    model.make_tiny_gguf(tmp_path / "f32.gguf", spec=spec)  # F32: block size 1, fine
    with pytest.raises(ContractError, match="block size 32"):
        model.make_tiny_gguf(tmp_path / "q8.gguf", spec=spec, default_type=QT.Q8_0)
    assert files_in(tmp_path) == ["f32.gguf"]


def test_rewrite_from_source_keeps_tokenizer_and_general_keys_and_drops_old_elastic_keys(tiny_elastic_llama, tmp_path):
    config, weights, src = load_gguf(tiny_elastic_llama.path)
    out = tmp_path / "copy.gguf"
    write_gguf(out, config, weights, source=src, default_type=QT.Q8_0)
    fields = contract.reader_fields(gguf.GGUFReader(out))
    assert not any(contract.is_elastic_key(k) for k in fields)
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "general.name"):
        assert fields[k] == src.fields[k], k
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    spec = tiny_elastic_llama.spec
    write_gguf(out, config, weights, source=src, spec=spec, name="renamed")
    fields = contract.reader_fields(gguf.GGUFReader(out))
    assert contract.read_spec(fields).ratios == pytest.approx(spec.ratios) and fields["general.name"] == "renamed"


def test_write_refuses_to_overwrite_its_source_file(tiny_llama, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_llama.path, path)
    before = path.read_bytes()
    config, weights, src = load_gguf(path)
    with pytest.raises(ContractError, match="input"):
        write_gguf(path, config, weights, source=src)
    assert path.read_bytes() == before and files_in(tmp_path) == ["m.gguf"]


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    c = model.tiny_config()
    w = model.random_weights(c)

    def boom(self, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(tmp_path / "x.gguf", c, w, extra_kv=model.tiny_tokenizer_kv())
    assert files_in(tmp_path) == []


def test_write_rejects_missing_unexpected_or_misshaped_tensors(tmp_path):
    c = model.tiny_config()
    w = model.random_weights(c)
    for bad, msg in (({k: v for k, v in w.items() if k != "blk.2.ffn_up.weight"}, "missing tensor.*blk.2.ffn_up"),
                     ({**w, "blk.0.extra.weight": torch.zeros(3)}, "unexpected"),
                     ({**w, "blk.0.attn_k.weight": torch.zeros(64, 256)}, "shape")):
        with pytest.raises(ContractError, match=msg):
            write_gguf(tmp_path / "x.gguf", c, bad)
    assert files_in(tmp_path) == []


def test_write_rejects_a_tokenizer_of_the_wrong_size(tmp_path):
    c = model.tiny_config()
    with pytest.raises(ContractError, match="tokens"):
        write_gguf(tmp_path / "x.gguf", c, model.random_weights(c), extra_kv=model.tiny_tokenizer_kv(c.n_vocab + 1))


def _write_raw(path, arch: str, tensors: dict[str, np.ndarray], kv=()) -> None:
    w = gguf.GGUFWriter(str(path), arch=arch)
    for k, v, t, s in kv:
        w.add_key_value(k, v, t, sub_type=s)
    for n, a in tensors.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_rejects_unsupported_arch_naming_arch_and_file(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_raw(path, "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ContractError, match=r"gpt2\.gguf.*'gpt2'"):
        load_gguf(path)


def test_load_rejects_truncated_and_non_gguf_files(tiny_llama, tmp_path):
    data = tiny_llama.path.read_bytes()
    for name, blob in (("cut.gguf", data[: len(data) // 2]), ("header.gguf", data[:100]), ("junk.gguf", b"not a gguf" * 10)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ContractError, match=name):
            load_gguf(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "absent.gguf")


def test_load_rejects_a_file_with_a_missing_tensor(tiny_llama, tmp_path):
    r = gguf.GGUFReader(tiny_llama.path)
    kv = [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
          for k, f in r.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"]
    tensors = {t.name: np.array(t.data) for t in r.tensors if t.name != "blk.3.ffn_gate.weight"}
    _write_raw(tmp_path / "m.gguf", "llama", tensors, kv)
    with pytest.raises(ContractError, match="blk.3.ffn_gate.weight"):
        load_gguf(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_folder(path, config: model.ModelConfig, weights: model.Weights, *, tied_lm_head: bool) -> None:
    """Write weights as a HF checkpoint: undo the llama q/k permutation (HF keeps rotate-half order)."""

    def unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:  # inverse of llama.cpp's permute
        d = t.shape[0] // n_head
        return t.reshape(n_head, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    names = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
             "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
    for x, y in (("q", "q"), ("k", "k"), ("v", "v")):
        names[f"attn_{x}.weight"], names[f"attn_{x}.bias"] = f"self_attn.{y}_proj.weight", f"self_attn.{y}_proj.bias"
    hf = {"model.embed_tokens.weight": weights["token_embd.weight"], "model.norm.weight": weights["output_norm.weight"]}
    if "output.weight" in weights:
        hf["lm_head.weight"] = weights["output.weight"]
    elif tied_lm_head:
        hf["lm_head.weight"] = weights["token_embd.weight"].clone()
    for name, t in weights.items():
        if name.startswith("blk."):
            _, il, rest = name.split(".", 2)
            if config.arch == "llama" and rest.startswith(("attn_q.", "attn_k.")):
                t = unpermute(t, config.n_head if rest.startswith("attn_q") else config.n_head_kv)
            hf[f"model.layers.{il}.{names[rest]}"] = t.to(torch.bfloat16 if "mlp" in names[rest] else torch.float32)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    half = len(hf) // 2
    items = list(hf.items())
    save_file({k: v.contiguous() for k, v in items[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: v.contiguous() for k, v in items[half:]}, str(path / "model-00002-of-00002.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM" if config.arch == "llama" else "Qwen2ForCausalLM"],
           "vocab_size": config.n_vocab, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
           "num_attention_heads": config.n_head, "num_key_value_heads": config.n_head_kv,
           "intermediate_size": config.n_ff, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_eps,
           "tie_word_embeddings": config.tied_embeddings, "max_position_embeddings": config.context_length,
           "rope_scaling": None}
    (path / "config.json").write_text(__import__("json").dumps(cfg))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_hf_maps_names_and_applies_llama_rope_permutation(arch, tmp_path):
    c = model.tiny_config(arch)
    w = model.random_weights(c)
    _hf_folder(tmp_path, c, w, tied_lm_head=True)
    config, got, none = model.load_hf(tmp_path)
    assert none is None and config == c
    assert set(got) == set(w)
    for k in w:
        if "ffn_" in k and k.endswith("weight") and "norm" not in k:  # stored as bf16 in the checkpoint
            assert torch.equal(got[k], w[k].to(torch.bfloat16).float()), k
        else:
            assert torch.equal(got[k], w[k]), k


def test_load_hf_rejects_unknown_architecture_and_rope_scaling(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ContractError, match="GPT2LMHeadModel"):
        model.load_hf(tmp_path)
    with pytest.raises(ContractError, match="rope scaling"):
        model.hf_config({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
