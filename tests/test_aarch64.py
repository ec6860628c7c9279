"""The patched llama.cpp cross-built for aarch64 (tools/build_aarch64.sh) runs elastic levels on ARM.

The binaries are static and run under qemu-aarch64-static, started explicitly (no binfmt_misc here). On ARM
the CPU backend repacks even Q8_0 weights (q8_0_4x4 with dotprod), and elastic levels run on those repacked
weights (patches/0006) as they do with --no-repack.

References, independent of the code under test: the physically truncated GGUF of the level (elms_gguf.truncate)
run by the stock loader with the same repack setting, and the dense model (which must give a different text).
Each ARM kernel family is reached by its own -march (the choice is made at compile time): ggml-cpu alone is
cross-built per -march and tests/native/repack_views.cpp compares prefix views of every repacked type with the
truncated weights under qemu, printing the kernel that ran. Timings under emulation mean nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from elms_gguf import contract, model, truncate
from elms_gguf.contract import ElasticSpec
from gguf import GGMLQuantizationType as QT

pytestmark = pytest.mark.aarch64

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "build_aarch64.sh"
BUILD = Path(os.environ.get("ELMS_AARCH64_BUILD_DIR", ROOT / "build" / "aarch64"))
QEMU = "qemu-aarch64-static"

# one short, deterministic generation: tiny model, 12 tokens, 2 threads, ubatches of 8
GEN_ARGS = ["-p", "hello world", "-n", "12", "--temp", "0", "-no-cnv", "--no-warmup", "-t", "2", "-c", "64",
            "-b", "8", "-ub", "8", "--seed", "1"]


def _toolchain_present() -> bool:
    return all(shutil.which(t) for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", QEMU))


@pytest.fixture(scope="session")
def completion_bin() -> Path:
    """build/aarch64/bin/llama-completion, built (or brought up to date: a no-op takes ~1 s) by the script."""
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")))
    proc = subprocess.run([str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * 3600)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        if not _toolchain_present():
            # only an environment without the Debian cross toolchain (apt unavailable/failing, no root) skips
            pytest.skip(f"aarch64 cross toolchain / {QEMU} could not be installed by {SCRIPT.name}:\n{tail}")
        pytest.fail(f"{SCRIPT.name} failed (rc {proc.returncode}):\n{tail}")
    exe = BUILD / "bin" / "llama-completion"
    assert exe.is_file(), f"{exe} missing after {SCRIPT.name}"
    assert shutil.which(QEMU), f"{QEMU} not on PATH after {SCRIPT.name}"
    desc = subprocess.run(["file", "-b", str(exe)], capture_output=True, text=True).stdout
    assert "aarch64" in desc and "statically linked" in desc, desc
    return exe


def uniform_spec(config: model.ModelConfig, kv: int, ff: int) -> ElasticSpec:
    """Level 0 (ratio 0.5): `kv` KV heads and `ff` FFN rows in every layer; level 1: dense."""
    d = config.dims()
    spec = ElasticSpec(levels=[contract.uniform_level(d, 0.5, kv, ff), contract.uniform_level(d, 1.0, d.n_head_kv, d.n_ff)],
                       model_id="tiny-uniform")
    for lv in spec.levels:
        lv.achieved_ratio = contract.level_ratio(d, lv)
    return spec


@pytest.fixture(scope="session")
def q8_files(tmp_path_factory) -> tuple[Path, Path]:
    """(elastic Q8_0 GGUF with a uniform half-width level 0, truncated GGUF of level 0)."""
    d = tmp_path_factory.mktemp("aarch64")
    cfg = model.tiny_config("llama")
    elastic, trunc = d / "elastic-q8_0.gguf", d / "trunc-q8_0.gguf"
    # seed 5: greedy decoding of this random model's level 0 changes token mid-way (most seeds repeat one token)
    model.make_tiny_gguf(elastic, seed=5, spec=uniform_spec(cfg, kv=1, ff=cfg.n_ff // 2), default_type=QT.Q8_0)
    truncate.export_static(elastic, trunc, 0)
    return elastic, trunc


# The last line llama-completion logs (common_perf_print). Its logger is asynchronous (one worker thread, FIFO)
# and is leaked, not drained, at exit (upstream llama.cpp issue 22142): on a busy machine the process can exit
# with rc 0 before the worker has written everything, generated text (stdout) included. When this line made it
# to stderr, every earlier entry -- the whole stdout -- was written before it; otherwise the run is repeated.
LAST_LOG_LINE = "graphs reused"


def run_arm(exe: Path, gguf: Path, *extra: str, attempts: int = 4) -> subprocess.CompletedProcess:
    """One generation under qemu (static binary: no -L sysroot needed) whose log was completely written."""
    cmd = [QEMU, str(exe), "-m", str(gguf), *GEN_ARGS, *extra]
    for _ in range(attempts):
        raw = subprocess.run(cmd, capture_output=True, timeout=300)
        # stdout stays bytes (a random tiny model emits partial UTF-8): compared byte for byte
        proc = subprocess.CompletedProcess(cmd, raw.returncode, raw.stdout, raw.stderr.decode(errors="replace"))
        assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
        if LAST_LOG_LINE in proc.stderr:
            return proc
    pytest.fail(f"llama-completion log incomplete in {attempts} runs of {cmd}:\n{proc.stderr[-3000:]}")


def test_arm_elastic_level_matches_truncated(completion_bin: Path, q8_files: tuple[Path, Path]) -> None:
    elastic, trunc = q8_files
    lvl = run_arm(completion_bin, elastic, "--elms-ratio", "0.5")
    ref = run_arm(completion_bin, trunc)  # stock defaults: repacked
    dense = run_arm(completion_bin, elastic)

    assert "elastic level 0 of 2" in lvl.stderr, lvl.stderr[-3000:]
    # the prompt is echoed, then 12 generated tokens: the output must be more than the prompt
    assert lvl.stdout.startswith(b" hello world") and len(lvl.stdout.strip()) >= len(b"hello world") + 8, lvl.stdout
    assert lvl.stdout == ref.stdout
    assert dense.stdout != lvl.stdout


def test_arm_levels_run_on_repacked_q8_0_and_with_no_repack(completion_bin: Path, q8_files: tuple[Path, Path]) -> None:
    """On ARM (dotprod) Q8_0 goes to the CPU_REPACK buffer by default, levels included; -nr still turns it off.

    -v: the load_tensors buffer lines and the per-tensor `repack:` lines are only logged verbosely.
    """
    elastic, trunc = q8_files
    for flag in (("--elms-ratio", "0.5"), ("--elms-level", "0")):
        lvl = run_arm(completion_bin, elastic, "-v", *flag)
        assert "elastic level 0 of 2" in lvl.stderr, lvl.stderr[-3000:]
        assert "CPU_REPACK model buffer" in lvl.stderr, lvl.stderr[-3000:]
        assert "repack tensor blk.0.ffn_up.weight with q8_0_4x4" in lvl.stderr
        assert "not placed in CPU_REPACK" not in lvl.stderr  # every view is whole row groups and blocks
    plain = run_arm(completion_bin, elastic, "-v", "-nr", "--elms-ratio", "0.5")
    assert "CPU_REPACK" not in plain.stderr and "repack tensor" not in plain.stderr, plain.stderr[-3000:]
    assert plain.stdout == run_arm(completion_bin, trunc, "-nr").stdout


# -march -> (qemu -cpu, the kernel each repacked type must run with)
ARM_KERNELS = {
    "armv8.2-a+dotprod": ("max", {"q4_0": "q4_0_4x4", "q4_K": "q4_K_8x4", "q5_K": "q5_K_8x4", "q6_K": "q6_K_8x4",
                                  "q8_0": "q8_0_4x4", "iq4_nl": "iq4_nl_4x4"}),
    "armv8.6-a+i8mm": ("max", {"q4_0": "q4_0_4x8", "q4_K": "q4_K_8x8", "q5_K": "q5_K_8x8", "q6_K": "q6_K_8x8",
                               "q8_0": "q8_0_4x8", "iq4_nl": "iq4_nl_4x4"}),
    # 256-bit SVE: Q4_0 takes the SVE 8x8 kernel
    "armv8.6-a+sve+i8mm": ("max,sve-default-vector-length=32",
                           {"q4_0": "q4_0_8x8", "q4_K": "q4_K_8x8", "q5_K": "q5_K_8x8", "q6_K": "q6_K_8x8",
                            "q8_0": "q8_0_4x8", "iq4_nl": "iq4_nl_4x4"}),
}


@pytest.mark.parametrize("march", list(ARM_KERNELS))
def test_arm_repacked_kernels_run_prefix_views_bit_identical_to_truncated_weights(completion_bin: Path,
                                                                                   march: str) -> None:
    # completion_bin: tools/build_aarch64.sh installs the cross toolchain and qemu (or the fixture skips)
    build = subprocess.run([str(ROOT / "tools" / "build_repack_views.sh"), march], capture_output=True, text=True,
                           timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    exe = build.stdout.strip().splitlines()[-1]
    cpu, kernels = ARM_KERNELS[march]
    r = subprocess.run([QEMU, "-cpu", cpu, exe], capture_output=True, text=True, timeout=600)
    print(r.stdout)  # which kernel each type ran with, for the record
    assert r.returncode == 0 and "repack_views: OK" in r.stdout, r.stdout + r.stderr[-2000:]
    for typ, kernel in kernels.items():
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(typ + " "))
        assert kernel in line and "products bit-identical" in line, line
