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
    assert CacheSpec().bytes_per_token(49152) == 32 * (2 + 2) + 4 * 8
