"""The patched llama.cpp cross-built for aarch64 (tools/build_aarch64.sh) runs elastic levels on ARM.

The binaries are static and run under qemu-aarch64-static, started explicitly (no binfmt_misc here). On ARM
the CPU backend repacks even Q8_0 weights (q8_0_4x4 with dotprod) unless --no-repack is given, so these tests
also check that --elms-ratio really turns repacking off there.

References, independent of the code under test: the physically truncated GGUF of the level (elms_gguf.truncate)
run by the stock loader with -nr, and the dense model (which must give a different text).
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
    ref = run_arm(completion_bin, trunc, "-nr")
    dense = run_arm(completion_bin, elastic, "-nr")

    assert "elastic level 0 of 2" in lvl.stderr, lvl.stderr[-3000:]
    # the prompt is echoed, then 12 generated tokens: the output must be more than the prompt
    assert lvl.stdout.startswith(b" hello world") and len(lvl.stdout.strip()) >= len(b"hello world") + 8, lvl.stdout
    assert lvl.stdout == ref.stdout
    assert dense.stdout != lvl.stdout


def test_arm_repacks_q8_0_unless_elastic(completion_bin: Path, q8_files: tuple[Path, Path]) -> None:
    """On ARM (dotprod) Q8_0 goes to the CPU_REPACK buffer by default: the --no-repack implication matters.

    -v: the load_tensors buffer lines and the per-tensor `repack:` lines are only logged verbosely.
    """
    elastic, _ = q8_files
    dense = run_arm(completion_bin, elastic, "-v")  # no --elms-*, no -nr: a plain dense load repacks
    assert "CPU_REPACK model buffer" in dense.stderr, dense.stderr[-3000:]
    assert "repack tensor blk.0.ffn_up.weight with q8_0_4x4" in dense.stderr
    for flag in (("--elms-ratio", "0.5"), ("--elms-level", "0")):
        lvl = run_arm(completion_bin, elastic, "-v", *flag)
        assert "elastic level 0 of 2" in lvl.stderr, lvl.stderr[-3000:]
        assert "CPU_REPACK" not in lvl.stderr and "repack tensor" not in lvl.stderr, lvl.stderr[-3000:]
        assert "CPU_Mapped model buffer" in lvl.stderr
