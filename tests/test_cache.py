"Teacher caches (kdlit.cache) on a tiny pair: round trip, order, resume, validation; the sparse loss at k = V."
import json, math, os

import pytest
import torch

from kdlit.cache import CacheSpec, TeacherCache, capture_cache
from kdlit.data import make_loaders
from kdlit.losses import SPARSE_METHODS, kd_loss, sparse_kd_loss, sparse_targets
from kdlit.models import tiny_pair

TEXT = ["hello world, this is text number %d. " % i * 5 for i in range(30)]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def dls(pair):
    return make_loaders(pair.tokenizer, TEXT, block_size=32, batch_size=4, n_valid=3, seed=1)


def cap(pair, dls, path, spec=None, **kw):
    return capture_cache(pair.teacher, dls, path, spec or CacheSpec(k=8), shard_tokens=32 * 7, progress=False, **kw)


def dense_targets(teacher, blocks, spec):
    with torch.no_grad(): logits = teacher(input_ids=blocks).logits
    return sparse_targets(logits, spec.method, spec.k, temps=spec.temps, dtype=getattr(torch, spec.dtype))


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_round_trip(pair, dls, tmp_path, method):
    spec = CacheSpec(method=method, k=8)
    c = cap(pair, dls, tmp_path, spec)
    assert torch.equal(c.blocks("train"), dls.train_blocks) and torch.equal(c.blocks("valid"), dls.valid_blocks)
    b = c.batch("train", [0, 5, 2])
    assert torch.equal(b["input_ids"], dls.train_blocks[[0, 5, 2]]) and torch.equal(b["labels"], b["input_ids"])
    ref = dense_targets(pair.teacher, dls.train_blocks[[0, 5, 2]], spec)
    tg = b["targets"]
    assert tg.method == method and tg.temps == spec.temps and tg.logp.dtype == torch.float16
    if method != "sample":                       # draws depend on the shard's generator, not on this batch
        assert torch.equal(tg.ids, ref.ids)
        torch.testing.assert_close(tg.logp, ref.logp, atol=2e-3, rtol=0)
    for name in ("lse", "dlse"):
        a, r = getattr(tg, name), getattr(ref, name)
        assert (a is None) == (r is None)
        if a is not None and method != "sample": torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["spec"]["method"] == method and man["vocab_size"] == 257 and man["data"]["seed"] == 1
    assert math.isclose(man["baseline"]["valid_ppl"], math.exp(man["baseline"]["valid_loss"]))


def test_capture_with_its_progress_bar(pair, dls, tmp_path):
    "The default progress=True (a console bar outside notebooks) captures the same cache as progress=False."
    a = capture_cache(pair.teacher, dls, tmp_path / "a", CacheSpec(k=8), shard_tokens=32 * 7)
    b = cap(pair, dls, tmp_path / "b")
    ta, tb = a.batch("train", [0, 1])["targets"], b.batch("train", [0, 1])["targets"]
    assert torch.equal(ta.ids, tb.ids) and torch.equal(ta.logp, tb.logp)


def test_loaders_see_the_live_order(pair, dls, tmp_path):
    c = cap(pair, dls, tmp_path)
    L = c.loaders()
    live = make_loaders(pair.tokenizer, TEXT, block_size=32, batch_size=4, n_valid=3, seed=1)
    for epoch in range(2):
        for a, b in zip(live.train, L.train): assert torch.equal(a["input_ids"], b["input_ids"])
    L.seek(5); live.seek(5)
    assert torch.equal(next(iter(L.train))["input_ids"], next(iter(live.train))["input_ids"])
    v = next(iter(L.valid))
    assert torch.equal(v["input_ids"], dls.valid_blocks[:3]) and v["targets"].shape == (3, 32, 8)


def test_cached_loss_equals_live_at_k_equal_v(pair, dls, tmp_path):
    c = cap(pair, dls, tmp_path, CacheSpec(method="tail_grid", k=257, dtype="float32"))
    b = c.batch("train", [1, 2])
    with torch.no_grad(): t, s = pair.teacher(input_ids=b["input_ids"]).logits, pair.student(input_ids=b["input_ids"]).logits
    for T in (1.0, 2.0):
        torch.testing.assert_close(sparse_kd_loss(s, b["targets"], temperature=T), kd_loss(s, t, temperature=T), atol=1e-5, rtol=1e-5)


class Killed(Exception): pass


def test_resumed_capture_equals_uninterrupted(pair, dls, tmp_path):
    spec = CacheSpec(method="sample", k=6)
    whole = cap(pair, dls, tmp_path / "whole", spec)
    calls, forward = [0], pair.teacher.forward
    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 7: raise Killed()
        return forward(*a, **k)
    pair.teacher.forward = dying
    try:
        with pytest.raises(Killed): cap(pair, dls, tmp_path / "part", spec)
    finally: del pair.teacher.forward
    part = tmp_path / "part"
    assert not (part / "manifest.json").exists() and (part / "capture.json").exists()
    done = sorted(p.name for p in part.glob("*.arrow"))
    assert 0 < len(done) < len(list((tmp_path / "whole").glob("*.arrow")))
    with pytest.raises(ValueError, match="unfinished capture"): TeacherCache(part)
    mtimes = {n: (part / n).stat().st_mtime_ns for n in done}
    resumed = cap(pair, dls, part, spec)
    assert all((part / n).stat().st_mtime_ns == m for n, m in mtimes.items())      # finished shards were kept
    for n in done + ["valid-00000-of-00001.arrow"]: assert (part / n).read_bytes() == (tmp_path / "whole" / n).read_bytes()
    a, b = json.loads((part / "manifest.json").read_text()), json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["baseline"] == b["baseline"]
    assert not list(part.glob(".*.tmp"))


def test_a_finished_capture_is_not_redone_and_another_is_refused(pair, dls, tmp_path):
    c = cap(pair, dls, tmp_path)
    m = (tmp_path / "manifest.json").stat().st_mtime_ns
    cap(pair, dls, tmp_path)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == m
    with pytest.raises(ValueError, match="spec.k"): cap(pair, dls, tmp_path, CacheSpec(k=4))
    c = cap(pair, dls, tmp_path, CacheSpec(k=4), overwrite=True)
    assert c.spec.k == 4
    (tmp_path / "other").mkdir(); (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"): cap(pair, dls, tmp_path / "other")


def test_manifest_mismatch_errors(pair, dls, tmp_path):
    c = cap(pair, dls, tmp_path)
    assert c.check(pair.student, pair.tokenizer, 32) is None
    with pytest.raises(ValueError, match="block_size is 64"): c.check(block_size=64)
    other = tiny_pair(vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary has 300"): c.check(other.student)
    assert c.check(other.student, pair.tokenizer) == 257                      # a padded head: slice to 257
    small = tiny_pair(vocab_size=200)
    with pytest.raises(ValueError, match="vocabulary has 200"): c.check(small.student, pair.tokenizer)
    from kdlit.data import byte_tokenizer
    tok = byte_tokenizer(); tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer differs"): c.check(tokenizer=tok)


def test_missing_manifest_and_damaged_shards(pair, dls, tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"): TeacherCache(tmp_path)
    cap(pair, dls, tmp_path)
    shard = sorted(tmp_path.glob("train-*.arrow"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=f"damaged teacher cache: shard .*{shard.name} has"): TeacherCache(tmp_path)
    flipped = bytearray(data); flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    TeacherCache(tmp_path)                                                  # same size: only the hash can tell
    with pytest.raises(ValueError, match="SHA-256"): TeacherCache(tmp_path, verify=True)
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"): TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest"): TeacherCache(tmp_path)


def test_spec_validation(pair, dls, tmp_path):
    with pytest.raises(ValueError, match="exceeds the vocabulary"): cap(pair, dls, tmp_path, CacheSpec(k=300))
    assert not list(tmp_path.iterdir())                                    # refused before anything is written
    with pytest.raises(ValueError, match="needs one temperature"): CacheSpec(method="sample", temps=(1.0, 2.0))
    with pytest.raises(ValueError, match="method"): CacheSpec(method="top")
    with pytest.raises(ValueError, match="dtype"): CacheSpec(dtype="int8")
    with pytest.raises(ValueError, match="k must"): CacheSpec(k=0)
    assert CacheSpec().bytes_per_token(49152) == 128 * (2 + 2) + 4 * 8


# --- training from a cache (CachedKD, from_cache) ---

from contextlib import contextmanager

from kdlit.cache import CachedKD, from_cache
from kdlit.data import byte_tokenizer
from kdlit.distiller import CheckpointCB, Distiller, EvalCB, ProgressCB, find_checkpoint
from kdlit.models import make_student

EXACT = CacheSpec(method="tail_grid", k=257, dtype="float32")       # k = V in fp32: the sparse loss is the dense one


def live_dls(batch_size=4):
    "Fresh loaders (a sampler remembers its position): the configuration the module's caches were captured from."
    return make_loaders(tiny_pair().tokenizer, TEXT, block_size=32, batch_size=batch_size, n_valid=3, seed=1)


@contextmanager
def no_teacher(pair):
    "Any call of the teacher's forward is an error while inside."
    def boom(*a, **k): raise AssertionError("the teacher was called")
    pair.teacher.forward = boom
    try: yield
    finally: del pair.teacher.forward


def kw(**k): return dict(dict(lr=3e-3, precision="no", verbose=False, cbs=[EvalCB(every=3), ProgressCB(bar=False)]), **k)


def test_fit_from_cache_with_the_teacher_absent(pair, tmp_path):
    c = cap(pair, live_dls(), tmp_path)
    with no_teacher(pair):
        d = from_cache(str(tmp_path), tiny_pair().student, **kw()).fit(5)
    assert d.teacher is None and isinstance(d.loss_fn, CachedKD) and not d.fused
    assert len(d.history) == 5 and all({"kd", "lm", "loss"} <= set(r) and r["skipped"] == 0 for r in d.history)
    assert [e["step"] for e in d.evals] == [0, 3, 5] and all(math.isfinite(e["val_kd"]) for e in d.evals)
    assert d.teacher_eval["val_lm"] == c.baseline["valid_loss"] and d.teacher_eval["val_tokens"] == c.baseline["valid_tokens"]
    assert d.history[0]["T"] == 2.0 and d.history[-1]["T"] == 1.5                    # the default recipe's curriculum
    d.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "config.json").exists()


@pytest.mark.parametrize("method,fused,chunked,divergence,accum", [
    ("tail_grid", False, None, "forward_kl", 1), ("tail_grid", True, False, "forward_kl", 2),
    ("tail_grid", False, True, "soft_ce", 1), ("topk", True, None, "forward_kl", 1), ("tail_grid", False, False, "soft_ce", 2)])
def test_cached_run_equals_live_run_at_k_equal_v(pair, tmp_path, method, fused, chunked, divergence, accum):
    c = cap(pair, live_dls(), tmp_path, CacheSpec(method=method, k=257, dtype="float32"))
    p = tiny_pair()
    live = Distiller(p.teacher, p.student, live_dls(), fused=fused, divergence=divergence, grad_accum=accum, **kw()).fit(7)
    with no_teacher(pair):
        cached = from_cache(c, tiny_pair().student, chunked=chunked, divergence=divergence, grad_accum=accum, **kw()).fit(7)
    assert live.fused == fused and cached.loss_fn.chunks(cached) == (chunked is not False)
    for a, b in zip(live.history, cached.history, strict=True):
        for k in ("loss", "kd", "lm", "grad_norm", "T", "tokens"): assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)
    for a, b in zip(live.evals, cached.evals, strict=True):
        assert (b["val_lm"], b["val_kd"]) == pytest.approx((a["val_lm"], a["val_kd"]), rel=2e-5, abs=1e-7)
    assert cached.teacher_eval["val_lm"] == pytest.approx(live.teacher_eval["val_lm"], rel=1e-6)


def _cached_run(path, steps, *, ckpt=None, resume=None, stop_at=None, every=3):
    from kdlit.distiller import Callback
    class Stop(Callback):
        order = 60
        def after_step(self, learn):
            if learn.step == stop_at: raise KeyboardInterrupt
    cbs = [EvalCB(every=4), ProgressCB(bar=False), Stop(), *([CheckpointCB(ckpt, every=every)] if ckpt else [])]
    d = from_cache(path, tiny_pair().student, grad_accum=2, **kw(cbs=cbs))
    try: d.fit(steps, resume=resume)
    except KeyboardInterrupt: pass
    return d


def test_resume_from_cache_equals_uninterrupted(pair, tmp_path):
    cap(pair, live_dls(), tmp_path / "c")
    full = _cached_run(tmp_path / "c", 10)
    part = _cached_run(tmp_path / "c", 10, ckpt=tmp_path / "ck", stop_at=7)        # killed after step 7
    assert len(part.history) == 7 and find_checkpoint(tmp_path / "ck").name == "step-0000006"
    cont = _cached_run(tmp_path / "c", 10, ckpt=tmp_path / "ck", resume=tmp_path / "ck")
    assert len(cont.history) == 10
    for a, b in zip(full.history, cont.history):
        for k in ("loss", "kd", "lm", "grad_norm", "lr", "T"): assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k)
    assert [e["val_lm"] for e in full.evals] == pytest.approx([e["val_lm"] for e in cont.evals], abs=1e-6)
    meta = json.loads((find_checkpoint(tmp_path / "ck") / "kdlit_meta.json").read_text())
    assert meta["source"].startswith("the teacher cache of") and meta["step"] == 10
    p = tiny_pair()                                   # a live run cannot continue a cached one
    with pytest.raises(ValueError, match="resume: the checkpoint was trained from the teacher cache"):
        Distiller(p.teacher, p.student, live_dls(), **kw()).fit(10, resume=tmp_path / "ck")
    other = cap(pair, live_dls(), tmp_path / "c8", CacheSpec(k=4))                  # nor a run from another cache
    with pytest.raises(ValueError, match="k=8 float16\\), this run from the teacher cache .* k=4"):
        from_cache(other, tiny_pair().student, **kw()).fit(10, resume=tmp_path / "ck")


def test_a_cache_that_does_not_fit_errors_before_training(pair, tmp_path):
    c = cap(pair, live_dls(), tmp_path)
    s = tiny_pair().student
    with pytest.raises(ValueError, match="does not fit this run: the student's vocabulary has 200"):
        from_cache(c, tiny_pair(vocab_size=200).student)
    tok = byte_tokenizer(); tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer differs"): from_cache(c, s, tokenizer=tok)
    with pytest.raises(ValueError, match="block_size is 64, the cache's 32"): from_cache(c, s, block_size=64)
    assert isinstance(from_cache(c, s, tokenizer=pair.tokenizer, block_size=32).loss_fn, CachedKD)
    for div in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match=f"divergence: '{div}' has no sound sparse form"): from_cache(c, s, divergence=div)
    from_cache(c, s, divergence="jsd", curriculum={"kd": 0.0, "lm": 1.0})                  # KD off: any divergence is moot
    from kdlit.alignment import FeatureAlignment
    with pytest.raises(ValueError, match="components: \\['feat'\\] align with the teacher's hidden states"):
        from_cache(c, s, curriculum={"kd": 0.5, "lm": 0.5, "feat": 0.1}, components=[FeatureAlignment(32, 32, [1, 3])])
    with pytest.raises(ValueError, match="pass teacher=None"): Distiller(pair.teacher, s, c.loaders(), loss=CachedKD(c))
    with pytest.raises(ValueError, match="teacher: a run from a teacher cache sets it"): from_cache(c, s, teacher=pair.teacher)
    with pytest.raises(ValueError, match="fused: a run from a teacher cache sets it"): from_cache(c, s, fused=True)
    with pytest.raises(ValueError, match="chunked: expected True, False or None"): from_cache(c, s, chunked="yes")
    biased = tiny_pair().student; biased.lm_head.bias = torch.nn.Parameter(torch.zeros(257))
    with pytest.raises(ValueError, match="chunked=True: the student's output head has a bias"): from_cache(c, biased, chunked=True)
    with pytest.raises(ValueError, match="dls: the train loader does not read this cache"): Distiller(None, s, live_dls(), loss=CachedKD(c))
    other = cap(pair, live_dls(), tmp_path / "k4", CacheSpec(k=4))
    with pytest.raises(ValueError, match="dls: the train loader does not read this cache"):
        Distiller(None, s, other.loaders(), loss=CachedKD(c))
    with pytest.raises(ValueError, match="teacher: expected a torch nn.Module .*None only with a loss source"): Distiller(None, s, live_dls())
    with pytest.raises(ValueError, match="no manifest.json"): from_cache(tmp_path / "nothing", s)


def test_a_batch_whose_tokens_are_not_its_targets_is_an_error(pair, tmp_path, monkeypatch):
    c = cap(pair, live_dls(), tmp_path)
    real = TeacherCache.batch
    def shifted(self, split, idx):                        # the tokens changed after the targets were read
        b = real(self, split, idx)
        if split == "train": b["input_ids"] = b["input_ids"].roll(1, dims=1)
        return b
    monkeypatch.setattr(TeacherCache, "batch", shifted)
    d = from_cache(c, tiny_pair().student, **kw(cbs=[EvalCB(at_start=False), ProgressCB(bar=False)]))
    with pytest.raises(ValueError, match="a train batch does not match its cached targets"): d.fit(3)
    assert d.step == 0
    b = real(c, "train", [0, 1])
    with pytest.raises(ValueError, match="without cached targets"): CachedKD(c).targets({k: v for k, v in b.items() if k != "targets"})
    with pytest.raises(ValueError, match="does not match"): CachedKD(c).targets(dict(b, cache_idx=torch.tensor([1, 0])))


def test_two_students_of_different_depth_from_one_cache(pair, tmp_path):
    cap(pair, live_dls(), tmp_path)
    students = (tiny_pair().student, make_student(pair.teacher, n_layers=3))      # built from the teacher's layers, before
    with no_teacher(pair):                                                            # (a copy would carry the patched forward)
        runs = [from_cache(tmp_path, s, **kw()).fit(8) for s in students]
    assert [r.accelerator.unwrap_model(r.student).config.num_hidden_layers for r in runs] == [2, 3]
    for r in runs: assert r.evals[-1]["val_lm"] < r.evals[0]["val_lm"] - 0.3
    assert runs[0].teacher_eval == runs[1].teacher_eval


def test_a_limited_evaluation_says_the_baseline_covers_the_whole_split(pair, tmp_path):
    cap(pair, live_dls(), tmp_path)
    d = from_cache(tmp_path, tiny_pair().student, batch_size=2, **kw(cbs=[EvalCB(batches=1), ProgressCB(bar=False)]))
    with pytest.warns(UserWarning, match="covers all 3 validation blocks; this evaluation covers the student on its first 2"): d.fit(1)
