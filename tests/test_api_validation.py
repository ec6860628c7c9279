"""The Python API checks its arguments at the call (errors name the argument) and an ElasticLlama can be shared
between threads (issue 28, item 5). Tiny models from conftest; the SLO class plans on a synthetic profile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from elms_gguf import profile
from elms_gguf.profile import SLO, Curve, LatencyProfile, LevelProfile, SLOError

from runtime_helpers import open_llm, require_runtime

CONTEXT = ("You are a science tutor. Answer each question.\n\n"
           "Question: What do plants need to make food?\nAnswer: sunlight")
QUESTION = "Question: What gas do animals breathe out?\nAnswer:"
MESSAGES = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]
PROMPTS = ["Hello world, this is", "The cat sat on the", "Once upon a time there"]


def synthetic_profile(path: str) -> LatencyProfile:
    """Latencies proportional to the level's ratio, with this model's fingerprint: deterministic decisions."""
    levels = ((0, 0.4), (1, 0.7), (2, 1.0), (-1, 1.0))
    lv = {i: LevelProfile(level=i, ratio=r, ttft=Curve((1.0, 0.1 * r + (0.001 if i == -1 else 0), 0.0)),
                          tpot_ms=2.0 * r) for i, r in levels}
    return LatencyProfile(model=profile.model_fingerprint(path), device=profile.device_info(1), levels=lv,
                          scorers={"selfinfo@L0": Curve((0.5, 0.001, 0.0))}, meta={"lengths": [16, 64]})


@pytest.fixture(scope="module")
def served(tiny_elastic_llama):
    require_runtime()
    from elms_gguf.serve import ElasticLlama

    path = str(tiny_elastic_llama.path)
    llm = ElasticLlama(path, scorer="selfinfo", profile=synthetic_profile(path), n_ctx=256, n_batch=128,
                       n_threads=1, verbose=False, slo_quantile=None)
    yield llm
    llm.close()


@pytest.fixture
def llm(tiny_elastic_llama_q8):
    m = open_llm(tiny_elastic_llama_q8.path)
    yield m
    m.close()


def text_of(out: dict) -> str:
    return out["choices"][0]["text"]


# -- serve.ElasticLlama: best_effort ---------------------------------------------------------------------


def test_best_effort_must_be_a_bool(served, tiny_elastic_llama):
    from elms_gguf.serve import ElasticLlama

    with pytest.raises(TypeError, match=r"best_effort must be True or False, got 'no'"):
        ElasticLlama(str(tiny_elastic_llama.path), profile=None, best_effort="no", n_ctx=64, n_threads=1,
                     verbose=False)
    slo = SLO(ttft_ms=0.01, tpot_ms=0.01)  # infeasible: best_effort decides between raising and serving
    for bad in ("no", 0, 1.0):
        with pytest.raises(TypeError, match=rf"best_effort must be True, False or None .*got {bad!r}"):
            served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, best_effort=bad, max_tokens=2)
        with pytest.raises(TypeError, match="best_effort"):
            served.create_chat_completion(MESSAGES, slo=slo, best_effort=bad, max_tokens=2)
    out = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, best_effort=True, max_tokens=2)
    assert out["elms"]["feasible"] is False  # a real bool still works


# -- SLO dicts and values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slo, key", [
    ({}, "'ttft_ms', 'tpot_ms'"),                      # missing both
    ({"ttft_ms": 500}, "'tpot_ms'"),                   # missing one
    ({"ttft": 5, "tpot": 5}, "'ttft', 'tpot'"),        # relative names without relative=True: unknown keys
    ({"ttft_ms": 500, "tpot_ms": 50, "tpt_ms": 1}, "'tpt_ms'"),
    ({"ttft": 0.5, "relative": True}, "'tpot'"),
    ({"ttft_ms": 500, "tpot_ms": 50, "relative": "no"}, "'relative'"),
])
def test_slo_dict_with_unknown_or_missing_keys_is_refused(served, slo, key):
    with pytest.raises(ValueError, match=key) as e:
        SLO.coerce(slo)
    assert isinstance(e.value, SLOError)
    with pytest.raises(SLOError, match=key):
        served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=2)
    with pytest.raises(SLOError, match=key):
        served.create_chat_completion(MESSAGES, slo=slo, max_tokens=2)
    # the same request with a complete dict is served
    ok = {"ttft_ms": 1e6, "tpot_ms": None}
    assert served.create_completion(prompt=QUESTION, context=CONTEXT, slo=ok, max_tokens=2)["elms"]["feasible"]


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0, float("inf")])
@pytest.mark.parametrize("field", ["ttft_ms", "tpot_ms"])
def test_slo_values_must_be_positive_numbers_named_by_field(served, bad, field):
    slo = {"ttft_ms": 1e6, "tpot_ms": 1e6, field: bad}
    with pytest.raises(SLOError, match=rf"SLO {field} \(ms\) must be a positive finite number"):
        served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=2)
    rel = {"ttft": 1.0, "tpot": 1.0, "relative": True, field[:4]: bad}
    with pytest.raises(SLOError, match=rf"SLO {field[:4]} \(fraction of dense\) must be a positive finite"):
        served.create_chat_completion(MESSAGES, slo=rel, max_tokens=2)


# -- max_tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1, ValueError), (float("nan"), TypeError),
                                      ("5", TypeError), (5.0, TypeError), (True, TypeError)])
def test_max_tokens_with_an_slo_must_be_a_positive_int(served, bad, err):
    slo = SLO.relative(1.0, 1.0)
    with pytest.raises(err, match=r"max_tokens must be") as e:
        served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)
    with pytest.raises(err, match=r"max_tokens must be"):
        served.create_chat_completion(MESSAGES, slo=slo, max_tokens=bad)


def test_max_tokens_type_is_checked_without_slo_and_none_keeps_its_meaning(served):
    with pytest.raises(TypeError, match=r"max_tokens must be an int or None, got '5' \(str\)"):
        served.create_completion(QUESTION, max_tokens="5")
    with pytest.raises(TypeError, match=r"max_tokens must be an int or None, got nan"):
        served.create_chat_completion(MESSAGES, max_tokens=float("nan"))
    # without an SLO, 0 keeps llama-cpp-python's meaning (up to the context): not refused
    assert isinstance(text_of(served.create_completion(QUESTION, max_tokens=0, temperature=0.0)), str)
    # with an SLO, None is llama-cpp-python's "until EOS or the context is full" (and the chat default)
    out = served.create_chat_completion(MESSAGES, slo=SLO.relative(1.0, 1.0), max_tokens=None, temperature=0.0)
    assert out["usage"]["total_tokens"] <= served.n_ctx() and out["elms"]["level"] in (-1, 2)


# -- chat messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, err, where", [
    ([], ValueError, r"messages is empty"),
    ([{"role": "user", "content": None}], ValueError, r"messages\[0\]\['content'\] is None"),
    ([{"role": "system", "content": CONTEXT}, {"role": "user"}], ValueError, r"messages\[1\]\['content'\] is missing"),
    ([{"role": "bot", "content": "hi"}], ValueError, r"messages\[0\]\['role'\] must be one of .*'bot'"),
    ([{"content": "hi"}], ValueError, r"messages\[0\]\['role'\] must be one of .*None"),
    ([{"role": "user", "content": 42}], ValueError, r"messages\[0\]\['content'\] must be a string or a list"),
    ([{"role": "user", "content": [{"type": "text"}]}], ValueError, r"messages\[0\]\['content'\]\[0\]\['text'\]"),
    ([{"role": "user", "content": ["hi"]}], ValueError, r"messages\[0\]\['content'\]\[0\] must be a content part"),
    (["hi"], TypeError, r"messages\[0\] must be a dict"),
    ("hi", TypeError, r"messages must be a list"),
    ({"role": "user", "content": "hi"}, TypeError, r"messages must be a list"),
])
@pytest.mark.parametrize("with_slo", [True, False])
def test_chat_messages_must_be_openai_shaped(served, messages, err, where, with_slo):
    kw = {"slo": SLO.relative(1.0, 1.0)} if with_slo else {}
    with pytest.raises(err, match=where):
        served.create_chat_completion(messages, max_tokens=2, **kw)


def test_valid_chat_messages_are_served(served):
    msgs = MESSAGES + [{"role": "assistant", "content": "carbon dioxide"},
                       {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    out = served.create_chat_completion(msgs, slo=SLO.relative(1.0, 1.0), max_tokens=2, temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant" and "elms" in out


# -- runtime.ElasticLlama.set_level --------------------------------------------------------------------


def test_set_level_refuses_levels_out_of_range_before_calling_llama_cpp(llm):
    from elms_gguf.runtime import ElasticError

    llm.set_level(1)
    for bad in (2**40, 2**32, 3, -2):  # 2**40 and 2**32 wrapped to level 0 through ctypes' int32
        with pytest.raises(ElasticError, match=rf"elastic level {bad} does not exist .*-1 \(dense\) to 2"):
            llm.set_level(bad)
        assert llm.level == 1
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=rf"level must be an int .*got {bad!r}"):
            llm.set_level(bad)
        assert llm.level == 1
    llm.set_level(-1)
    assert llm.level == -1


# -- threads ---------------------------------------------------------------------------------------------

# Run in a child process: without the lock two threads on one llama context crash the interpreter (SIGSEGV,
# "free(): invalid pointer"), which must fail this test, not end the session.
_THREADS_CHILD = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[2])
from runtime_helpers import open_llm

PROMPTS = json.loads(sys.argv[3])
llm = open_llm(sys.argv[1])

def complete(level, prompt):
    with llm.exclusive(level=level):  # the level switch and the completion as one unit
        llm.reset()  # a full prefill every time: the same numerics as the reference, whatever ran before
        return llm.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"]

ref = {lvl: [complete(lvl, p) for p in PROMPTS] for lvl in (0, 1)}
got = {0: [], 1: []}
errors = []

def worker(lvl):
    try:
        for i in range(50):
            got[lvl].append(complete(lvl, PROMPTS[i % len(PROMPTS)]))
    except BaseException as e:
        errors.append(repr(e))

threads = [threading.Thread(target=worker, args=(lvl,)) for lvl in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"ref": ref, "got": got, "errors": errors}))
"""


def test_two_threads_share_one_model_each_at_its_own_level(tiny_elastic_llama_q8):
    """100 greedy completions from 2 threads, one at level 0 and one at level 1, on one ElasticLlama: each equals
    the single-threaded output of its level and prompt (without the lock the process crashes or levels mix)."""
    require_runtime()
    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    try:  # about 2 s here; without the lock the child crashes, or sometimes deadlocks inside llama.cpp
        r = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(tiny_elastic_llama_q8.path), tests_dir,
                            json.dumps(PROMPTS)], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"two threads on one model hung for {e.timeout} s: {(e.stderr or b'')[-2000:]!r}")
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["errors"] == []
    ref = {int(k): v for k, v in res["ref"].items()}
    assert ref[0] != ref[1]  # the levels answer differently: a mixed-up level would show
    for lvl, texts in res["got"].items():
        lvl = int(lvl)
        assert len(texts) == 50
        want = [ref[lvl][i % len(PROMPTS)] for i in range(50)]
        bad = [i for i, (a, b) in enumerate(zip(texts, want)) if a != b]
        assert not bad, f"level {lvl}: requests {bad} differ from the single-threaded output"


def test_a_stream_holds_the_model_until_it_is_read_or_closed(llm):
    llm.set_level(0)
    llm.reset()
    whole = text_of(llm.create_completion(PROMPTS[1], max_tokens=6, temperature=0.0))
    llm.reset()
    stream = llm.create_completion(PROMPTS[1], max_tokens=6, temperature=0.0, stream=True)
    first = next(stream)
    # the same thread: another call would interleave with the open stream (waiting would never end)
    with pytest.raises(RuntimeError, match="stream of this model is still open"):
        llm.create_completion(PROMPTS[0], max_tokens=2)
    with pytest.raises(RuntimeError, match="still open"):
        llm.set_level(1)
    # another thread: waits until the stream is done
    other: list[str] = []
    t = threading.Thread(target=lambda: other.append(
        text_of(llm.create_completion(PROMPTS[0], max_tokens=2, temperature=0.0))))
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and not other  # blocked by the open stream
    rest = "".join(text_of(c) for c in stream)
    t.join(timeout=60)
    assert not t.is_alive() and len(other) == 1
    assert text_of(first) + rest == whole  # the stream was not disturbed
    # closing a half-read stream, or dropping one never read, lets the next call in
    stream = llm.create_completion(PROMPTS[1], max_tokens=6, stream=True)
    next(stream)
    stream.close()
    llm.set_level(1)
    stream = llm.create_completion(PROMPTS[1], max_tokens=6, stream=True)
    del stream
    assert llm.level == 1
    llm.set_level(0)
    # a stream handed to another thread and read to its end there releases the model too
    llm.reset()
    stream = llm.create_completion(PROMPTS[1], max_tokens=6, temperature=0.0, stream=True)
    read: list[str] = []
    t = threading.Thread(target=lambda: read.append("".join(text_of(c) for c in stream)))
    t.start()
    t.join(timeout=60)
    assert read == [whole]
    llm.set_level(1)


def test_served_stream_holds_the_model_and_keeps_its_level(served):
    slo = SLO(ttft_ms=1e6, tpot_ms=1e6)
    served.set_level(0)
    stream = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=4, temperature=0.0,
                                      stream=True)
    next(stream)
    switched: list[int] = []
    t = threading.Thread(target=lambda: (served.set_level(0), switched.append(served.level)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # the other thread's switch waits for the stream
    chunks = list(stream)
    t.join(timeout=60)
    assert chunks[-1]["elms"]["level"] == -1 and switched == [0]
