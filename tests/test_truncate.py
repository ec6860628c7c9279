"""elms_gguf.truncate: one level exported as a standalone GGUF, and the elastic keys stripped."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from elms_gguf import contract, model, truncate
from elms_gguf.contract import ContractError, Level
from elms_gguf.truncate import export_static, strip_elastic

TOKENS = torch.tensor([1, 5, 9, 100, 200, 30, 7, 260, 270, 3])


def read(path):
    r = gguf.GGUFReader(path)
    return r, contract.reader_fields(r), {t.name: t for t in r.tensors}


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def prefix(name: str, a: np.ndarray, widths, dims: contract.ModelDims) -> np.ndarray | None:
    """What level ``widths`` keeps of dequantized tensor ``a`` (independent of truncate's byte slicing)."""
    if not name.startswith("blk."):
        return a
    il, kind = int(name.split(".")[1]), name.split(".")[2]
    kv, ff = widths[il]
    if (kv == 0 and kind.startswith("attn")) or (ff == 0 and kind.startswith("ffn")):
        return None  # the block is skipped: deci has no such tensor
    hq = kv * dims.group * dims.head_dim
    return {"attn_q": lambda: a[:hq], "attn_k": lambda: a[: kv * dims.head_dim], "attn_v": lambda: a[: kv * dims.head_dim],
            "ffn_gate": lambda: a[:ff], "ffn_up": lambda: a[:ff], "attn_output": lambda: a[:, :hq],
            "ffn_down": lambda: a[:, :ff]}.get(kind, lambda: a)()


def test_export_uniform_level_keeps_the_arch_with_smaller_counts_and_no_elastic_keys(tiny_elastic_qwen2, tmp_path):
    tm = tiny_elastic_qwen2
    out = tmp_path / "ffn-only.gguf"
    lv = Level(0.6, [2] * 4, [256] * 4)  # all KV heads: qwen2 can stay qwen2
    export_static(tm.path, out, lv, source_name="tiny")
    _, fields, tensors = read(out)
    assert fields["general.architecture"] == "qwen2" and fields["general.name"].startswith("tiny (elms custom level")
    assert not any(contract.is_elastic_key(k) for k in fields)
    assert (fields["qwen2.attention.head_count"], fields["qwen2.attention.head_count_kv"], fields["qwen2.feed_forward_length"]) == (4, 2, 256)
    assert fields["qwen2.attention.key_length"] == fields["qwen2.attention.value_length"] == 64
    assert fields["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [256, 256] and list(tensors["blk.0.ffn_up.weight"].shape) == [256, 256]


def test_export_llama_uniform_level_by_index_has_prefix_shapes(tiny_llama, tmp_path):
    src = tmp_path / "u.gguf"
    c, w, s = model.load_gguf(tiny_llama.path)
    spec = contract.ElasticSpec(levels=[contract.uniform_level(c.dims(), 0.5, 1, 256), contract.uniform_level(c.dims(), 1.0, 2, 512)])
    model.write_gguf(src, c, w, source=s, spec=spec, default_type=QT.Q8_0)
    export_static(src, tmp_path / "l0.gguf", 0)
    _, fields, tensors = read(tmp_path / "l0.gguf")
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"], fields["llama.feed_forward_length"]) == (2, 1, 256)
    shapes = {n: list(t.shape) for n, t in tensors.items()}  # ggml ne order: (in, out)
    assert shapes["blk.1.attn_q.weight"] == [256, 128] and shapes["blk.1.attn_k.weight"] == [256, 64]
    assert shapes["blk.1.attn_output.weight"] == [128, 256] and shapes["blk.1.ffn_down.weight"] == [256, 256]
    assert shapes["token_embd.weight"] == [256, model.TINY_VOCAB_SIZE]


def test_export_dequantized_weights_equal_prefix_slices_of_the_source(tiny_elastic_llama_q8, tmp_path):
    tm = tiny_elastic_llama_q8
    dims = tm.config.dims()
    _, _, src_t = read(tm.path)
    for i, lv in enumerate(tm.spec.levels):
        out = tmp_path / f"l{i}.gguf"
        export_static(tm.path, out, i)
        _, _, out_t = read(out)
        widths = model.level_widths(lv)
        for name, t in src_t.items():
            want = prefix(name, gguf.quants.dequantize(t.data, t.tensor_type), widths, dims)
            if want is None:
                assert name not in out_t, name
                continue
            got = out_t[name]
            assert got.tensor_type == t.tensor_type, name
            np.testing.assert_array_equal(gguf.quants.dequantize(got.data, got.tensor_type), want, err_msg=name)


def test_export_of_per_layer_widths_is_deci_with_arrays_and_without_skipped_blocks(tiny_elastic_llama, tmp_path):
    tm = tiny_elastic_llama
    out = tmp_path / "l0.gguf"
    export_static(tm.path, out, 0.4)  # level 0: kv [2,1,0,2], ff [512,128,0,512]
    _, fields, tensors = read(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2, 0, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 0, 2]
    assert fields["deci.feed_forward_length"] == [512, 128, 0, 512]
    assert fields["deci.attention.key_length"] == 64 and fields["deci.block_count"] == 4
    assert not any(k.startswith("llama.") for k in fields)
    assert not [n for n in tensors if n.startswith("blk.2.")]  # layer 2 is skipped entirely
    assert "blk.1.ffn_norm.weight" in tensors and list(tensors["blk.1.ffn_down.weight"].shape) == [128, 256]


def test_export_picks_the_nearest_level_for_a_ratio(tiny_elastic_llama, tmp_path):
    export_static(tiny_elastic_llama.path, tmp_path / "r.gguf", 0.66)
    _, fields, _ = read(tmp_path / "r.gguf")
    assert fields["deci.feed_forward_length"] == [512, 256, 256, 512] and "level 1" in fields["general.name"]


@pytest.mark.parametrize("fixture,arch", [("tiny_llama", "llama"), ("tiny_qwen2", "llama")])
def test_exported_file_computes_what_the_level_computes_on_the_full_file(fixture, arch, request, tmp_path):
    """Loaded back, the export runs the same model as forward(widths=level) on the full weights.

    Half the KV heads: qwen2 is exported as llama with its q/k rows permuted for NORM rope.
    """
    tm = request.getfixturevalue(fixture)
    lv = Level(0.5, [1] * 4, [256] * 4)
    out = tmp_path / "x.gguf"
    export_static(tm.path, out, lv)
    c, w, _ = model.load_gguf(tm.path, dtype=torch.float64)
    want = model.forward(c, w, TOKENS, widths=lv, dtype=torch.float64)
    c2, w2, _ = model.load_gguf(out, dtype=torch.float64)
    assert (c2.arch, c2.n_head, c2.n_head_kv, c2.n_ff, c2.qkv_bias) == (arch, 2, 1, 256, c.qkv_bias)
    got = model.forward(c2, w2, TOKENS, dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-9)


def test_qwen2_kv_reduction_is_refused_when_the_arch_must_stay(tiny_elastic_qwen2, tmp_path):
    with pytest.raises(ContractError, match="qwen2"):
        export_static(tiny_elastic_qwen2.path, tmp_path / "x.gguf", 0, allow_arch_change=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kv,ff,msg", [
    ([0, 2, 2, 2], [512, 512, 512, 512], "layer 0"),
    ([2, 1, 2, 2], [512, 0, 512, 512], "layer 1 keeps attention"),
    ([2, 2, 2, 0], [512, 512, 512, 0], "last layer"),
])
def test_levels_that_llama_cpp_deci_cannot_run_are_refused(tiny_elastic_llama, tmp_path, kv, ff, msg):
    with pytest.raises(ContractError, match=msg):
        export_static(tiny_elastic_llama.path, tmp_path / "x.gguf", Level(0.5, kv, ff))
    assert os.listdir(tmp_path) == []


def test_export_rejects_bad_levels(tiny_llama, tiny_elastic_llama_q8, tmp_path):
    with pytest.raises(ContractError, match="no elastic levels"):
        export_static(tiny_llama.path, tmp_path / "x.gguf", 0)
    with pytest.raises(ContractError, match="level 7"):
        export_static(tiny_elastic_llama_q8.path, tmp_path / "x.gguf", 7)
    with pytest.raises(ContractError, match="block size 32"):
        export_static(tiny_elastic_llama_q8.path, tmp_path / "x.gguf", Level(0.5, [2] * 4, [100] * 4))
    assert os.listdir(tmp_path) == []
    export_static(tiny_llama.path, tmp_path / "x.gguf", Level(0.5, [1] * 4, [128] * 4))  # explicit Level: fine


def test_export_refuses_to_overwrite_its_input_and_never_modifies_it(tiny_elastic_llama, tmp_path):
    src = tmp_path / "e.gguf"
    shutil.copy(tiny_elastic_llama.path, src)
    before = sha(src)
    for fn in (lambda: export_static(src, src, 0), lambda: strip_elastic(src, src)):
        with pytest.raises(ContractError, match="input"):
            fn()
    export_static(src, tmp_path / "out.gguf", 1)
    assert sha(src) == before and sorted(os.listdir(tmp_path)) == ["e.gguf", "out.gguf"]


def test_strip_elastic_removes_exactly_the_elms_keys_and_keeps_tensor_bytes(tiny_elastic_llama_q8, tmp_path):
    out = tmp_path / "plain.gguf"
    strip_elastic(tiny_elastic_llama_q8.path, out)
    r_src, f_src, t_src = read(tiny_elastic_llama_q8.path)
    r_out, f_out, t_out = read(out)
    assert set(f_src) - set(f_out) == {k for k in f_src if contract.is_elastic_key(k)} != set()
    assert all(f_out[k] == f_src[k] for k in f_out)
    assert [t.name for t in r_out.tensors] == [t.name for t in r_src.tensors]
    for n, t in t_src.items():
        assert t_out[n].tensor_type == t.tensor_type and t_out[n].data.tobytes() == t.data.tobytes(), n
    assert contract.read_spec(f_out) is None


def test_cli_exports_and_strips(tiny_elastic_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        truncate.main(["--help"])
    assert ex.value.code == 0 and "export" in capsys.readouterr().out
    assert truncate.main(["export", str(tiny_elastic_llama.path), str(tmp_path / "a.gguf"), "--ratio", "0.7"]) == 0
    assert truncate.main(["strip", str(tiny_elastic_llama.path), str(tmp_path / "b.gguf")]) == 0
    assert truncate.main(["export", str(tiny_elastic_llama.path), str(tmp_path / "c.gguf"), "--level", "9"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf"]
