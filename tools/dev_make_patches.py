"""Regenerate patches/*.patch from a developer's working copy of third_party/llama.cpp.

Development loop (the tree is git-ignored; the patches are what we commit):

    cd third_party/llama.cpp && git init -q && git add -A && git commit -qm pristine   # once, on a fresh tree
    ... edit llama.cpp sources, tools/build_llama.sh to rebuild incrementally ...
    python tools/dev_make_patches.py        # writes patches/000N-*.patch, each headed by what and why

Every file changed in the tree must belong to exactly one patch below; the script refuses otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.path.join(ROOT, "third_party", "llama.cpp")

SERIES: list[tuple[str, str, list[str]]] = [
    (
        "0001-elastic-model-tables-and-c-api.patch",
        """\
elastic (ELMS) model tables, validation, per-level LoRA and the C API

What: an elastic GGUF (written by elms-gguf's elms-convert) carries `elms.*` keys: level ratios and, per level
and layer, the active KV-head count and FFN width (0 = block skipped), plus an optional LoRA adapter per level.
This patch loads them onto the model (src/llama-elastic.{h,cpp}), validates them at load (table lengths = n_layer,
widths within the full sizes, nested levels, every column-sliced width whole blocks of the tensor's actual type:
errors name the level, layer and tensor), loads and checks the per-level adapters (CRC-32, model id, level,
and that every tensor covers what its level reads: llama_adapter_lora_init_elastic accepts adapters stored cut
to their level's widths, which stock --lora adapters keep refusing, and keeps their B transposed, {n_out, r}, in
A's type when A is block-quantized (Q8_0 adapters: B's own rows, r values, are too short for a block), with the
scale alpha/r multiplied in when that is exact; the graph node budget counts one level's adapter, not all of them;
the per-layer widths of a level, llama_elastic_level::layer(), are the one place the graph's views, the load-time
block checks and the adapter coverage checks take them from),
keeps the selected level in llama_cparams and exposes it in the C API:
llama_model_n_elastic_levels, llama_model_elastic_ratio, llama_set_elastic_level, llama_set_elastic_ratio,
llama_get_elastic_level, llama_elastic_last_error.

Why: switching sub-model must be a pointer change, not a reload. Standard head_count/feed_forward_length keys
stay full width, so stock llama.cpp still loads the file as the dense model, and with no level set this patch
changes nothing. Weights may be repacked (CPU_REPACK, the CPU backend's default): the loader places a weight in
a buffer type only if that type runs every prefix view the levels read of it (llama_model_loader::elastic_views;
a repacked layout runs whole row groups and whole blocks, patches/0006), so a weight with other widths stays in
plain memory and only it loses the repacked kernels. Each level records at load whether the loaded weights can
run it (non-CPU buffers cannot), and llama_set_elastic_level refuses it otherwise, never running garbage.
""",
        [
            "include/llama.h",
            "src/CMakeLists.txt",
            "src/llama-model-loader.h",
            "src/llama-model-loader.cpp",
            "src/llama-adapter.h",
            "src/llama-adapter.cpp",
            "src/llama-elastic.h",
            "src/llama-elastic.cpp",
            "src/llama-model.h",
            "src/llama-model.cpp",
            "src/llama.cpp",
            "src/llama-cparams.h",
            "src/llama-context.h",
            "src/llama-context.cpp",
        ],
    ),
    (
        "0002-elastic-graph-views-kv-prefix-lora.patch",
        """\
elastic (ELMS) graph: zero-copy weight views, KV-cache head prefix, LoRA through views

What: llm_graph_context::build_elastic_layer() replaces a layer's weights by ggml views at the context's level
(rows of wq/wk/wv/ffn_gate/ffn_up and their biases, columns of wo/ffn_down keeping the row stride). The llama
and qwen2 graphs use it and skip an attention or FFN block whose width is 0 (residual passes; a skipped
attention neither writes nor reads its KV cache). build_attn reads a head prefix of the cache and
llama_kv_cache::cpy_k/cpy_v write one. build_lora_mm finds adapters through view_src and slices A/B like the
weight, and adds the level's own LoRA apart from the user's adapters: its transposed B as
ggml_out_prod(B^T, (A x)^T) (vector FMAs along the output instead of one length-r dot product per output: those
dots and their loop were about two thirds of LoRA's decode cost on CPU, perf on SmolLM2 level 0.5), with no scale
node when the scale is folded into B. The level is part of the graph-reuse key.

Why: this is what makes level k of one GGUF compute exactly what a physically truncated GGUF of the same widths
computes in stock llama.cpp (tests compare logits bit for bit), without copying a single weight. Compute
buffers stay reserved at full width (the largest graph).
""",
        [
            "src/llama-graph.h",
            "src/llama-graph.cpp",
            "src/llama-kv-cache.cpp",
            "src/models/llama.cpp",
            "src/models/qwen2.cpp",
        ],
    ),
    (
        "0003-ggml-cpu-prefetch-strided-src0-rows.patch",
        """\
ggml-cpu: software-prefetch src0 rows that have gaps between them (column-prefix views)

What: in ggml_compute_forward_mul_mat_one_chunk, when nb01 > row_size(ne00) (a column-prefix view such as an
elastic level's attn_output/ffn_down), prefetch the used prefix of the rows ~4 KiB of used data ahead, on the
first src1 column of each block. Contiguous tensors take exactly the old path.

Why: single-token decode on a column view ran the same code as on a contiguous cut but 15-26% slower end to end
(research: anchor-speeds.md, colview-fix.md): short row islands separated by gaps defeat the hardware stream
prefetchers and the GEMV becomes latency bound. Keep the hint constant: gcc dropped every prefetch when it sat
behind a run-time switch (tests check the object contains prefetcht0). Numerics are unchanged.
""",
        ["ggml/src/ggml-cpu/ggml-cpu.c"],
    ),
    (
        "0004-elms-cli-flags.patch",
        """\
--elms-ratio / --elms-level / --elms-lora for the common tools and llama-bench

What: common options (llama-cli, llama-completion, llama-server, llama-perplexity, ...) select an elastic level
(nearest ratio, or an index) right after the context is created, before the warm-up; weights are repacked as by
default (--repack 0 still turns it off).
--elms-lora {required,optional,off} sets how the per-level adapters are treated. llama-bench, which has its own
parser, gets --elms-ratio F applied to every test.

Why: so that the standard tools run and measure any level of an elastic GGUF. A refused level flushes the common
log before the tool exits: upstream leaks the logger and never joins its thread, so an error message queued just
before a failed exit could be lost (seen in CI: llama-completion exited 1 with the reason missing from stderr).
llama-perplexity flushes it before returning for the same reason: on a loaded machine its "Final estimate" line
(what the tests compare across levels) was missing from 5 runs in a row.
""",
        ["common/arg.cpp", "common/common.cpp", "common/common.h", "tools/llama-bench/llama-bench.cpp",
         "tools/perplexity/perplexity.cpp"],
    ),
    (
        "0005-ggml-cpu-out-prod-f16-convert-rows-once.patch",
        """\
ggml-cpu: out_prod with an F16 or quantized src0 converts each src0 row once

What: ggml_compute_forward_out_prod_f16_f32 / _q_f32 converted every src0 row to F32 once per dst row (F16 with the
scalar ggml_fp16_to_fp32_row of ggml-base); they now convert each row once per (thread, i2, i3), F16 with the SIMD
ggml_cpu_fp16_to_fp32, and apply it to the thread's dst rows. Every dst row accumulates over the src0 rows in
the same order as before: results are bit-identical.

Why: the elastic level adapters apply B as an outer product (patch 0002); the scalar conversion alone cost
about as much as the rest of LoRA's decode overhead (perf on SmolLM2 level 0.5: 9 % of all samples), and a
prefill of n tokens converted each row n times.
""",
        ["ggml/src/ggml-cpu/ops.cpp"],
    ),
    (
        "0006-ggml-cpu-repack-prefix-views.patch",
        """\
ggml-cpu: prefix views of repacked weights run on the repacked kernels

What: a view of a tensor in the CPU_REPACK buffer gets its parent's traits (ggml_repack_get_tensor_traits) when it
is a prefix of whole row groups (rows, NB_COLS of the layout) and whole blocks (columns) with the parent's row
stride, and none otherwise (supports_op then refuses it). forward_mul_mat_one_chunk runs a column-prefix view
(ne00 below the parent's width, detected by nb01 != row size of ne00) one row group at a time: the layout stores
[row group][K block][row in group], so a group's first blocks are the view's, but groups lie NB_COLS * nb01 apart
while the kernels step by the n they are given. Whole tensors and row-prefix views take the single call as before.

Why: elastic (ELMS) levels read prefix views of the weights. Before, a view's traits were recomputed from its own
shape (a 4-row-aligned view of an 8x8 layout could pick 4x8 traits) and a column view walked the groups with its
own width as stride: wrong output. Now a level computes exactly what the stock repacked kernels compute on the
physically truncated tensor (tests compare logits bit for bit), with one copy of the weights.
Stock graphs (no views of repacked weights) are unchanged.
""",
        ["ggml/src/ggml-cpu/repack.cpp"],
    ),
]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", TREE, *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    if not os.path.isdir(os.path.join(TREE, ".git")):
        print(f"{TREE} has no git baseline; see this script's docstring", file=sys.stderr)
        return 1
    git("add", "-N", ".")  # new files show up in the diff
    changed = set(git("diff", "--name-only", "HEAD").split())
    listed = {f for _, _, files in SERIES for f in files}
    if changed - listed:
        print(f"changed files not in any patch: {sorted(changed - listed)}", file=sys.stderr)
        return 1
    out_dir = os.path.join(ROOT, "patches")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".patch"):
            os.remove(os.path.join(out_dir, name))
    for name, header, files in SERIES:
        diff = git("diff", "HEAD", "--", *files)
        if not diff:
            print(f"{name}: empty, skipped", file=sys.stderr)
            continue
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(header.rstrip() + "\n\n")
            f.write(diff)
        print(f"wrote patches/{name} ({diff.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
