"Alignment components (kdlit.alignment): layer maps, the four losses on tiny Llamas, masks, gradients, errors."
import math, types, warnings
import pytest, torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM
from kdlit.alignment import (layer_map, pair_layer_map, FeatureAlignment, LayerAlignment, AttentionAlignment,
                             ContrastiveAlignment, alignment_components, ensure_attentions)

torch.set_num_threads(1)


def tiny(hidden, layers, heads, kv=2, seed=0, attn="eager"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def pair():
    teacher = tiny(48, 4, 6, seed=1).eval().requires_grad_(False)
    student = tiny(32, 2, 4, seed=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    am = torch.ones(4, 12, dtype=torch.long)
    am[1, :5] = 0; am[2, :11] = 0                       # left padding
    return teacher, student, ids, am


def fwd(model, ids, am):
    return model(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)


def components(student, teacher):
    return [FeatureAlignment.from_models(student, teacher), FeatureAlignment.from_models(student, teacher, loss="cosine"),
            FeatureAlignment.from_models(student, teacher, loss="nmse"),
            LayerAlignment.from_models(student, teacher), LayerAlignment.from_models(student, teacher, positions="last"),
            AttentionAlignment.from_models(student, teacher), AttentionAlignment.from_models(student, teacher, kind=[1, 3]),
            ContrastiveAlignment.from_models(student, teacher), ContrastiveAlignment.from_models(student, teacher, proj_dim=8)]


# --- layer maps -------------------------------------------------------------------------------------------------

def test_layer_map_kinds():
    assert layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert layer_map(3, 30, "last") == [27, 28, 29]
    assert layer_map(3, 30, [0, 10, 29]) == [0, 10, 29]
    assert layer_map(n=30, layers=[0, 3, 6]) == [0, 3, 6]
    for bad, msg in [(dict(m=3, n=4, kind=[0, 1]), "expected 3, got 2"), (dict(m=2, n=4, kind=[0, 4]), "[0, 3]"),
                     (dict(m=2, n=4, kind=[0, -1]), "entry 1 is -1"), (dict(m=5, n=4, kind="last"), "m <= n"),
                     (dict(m=2, n=4, kind="every"), "`kind` must be one of"), (dict(m=0, n=4), "`m` must be")]:
        with pytest.raises(ValueError, match=None) as e: layer_map(**bad)
        assert msg in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_uniform_map_properties(m, n):
    lm = layer_map(m, n)
    assert len(lm) == m and all(0 <= t < n for t in lm)
    assert lm == sorted(lm) and lm[-1] == n - 1           # monotone, last meets last
    if m <= n: assert len(set(lm)) == m                   # no teacher layer used twice when the student is shallower


def test_pair_layer_map_uses_make_student_record(pair):
    teacher, student, *_ = pair
    assert pair_layer_map(student, teacher) == [1, 3]
    student.kdlit_info = types.SimpleNamespace(layers=[0, 2])
    try:
        assert pair_layer_map(student, teacher) == [0, 2]
        assert FeatureAlignment.from_models(student, teacher).pairs == [(0, 0), (1, 2)]
        assert pair_layer_map(student, teacher, "last") == [2, 3]
    finally:
        del student.kdlit_info


# --- zero at identity -------------------------------------------------------------------------------------------

def test_zero_when_student_is_teacher(pair):
    teacher, _, ids, am = pair
    out, mask = fwd(teacher, ids, am), am.bool()
    ident = layer_map(4, 4)
    for c in [FeatureAlignment(48, 48, ident), LayerAlignment(48, 48, ident), LayerAlignment(48, 48, ident, positions="last"),
              AttentionAlignment(ident), AttentionAlignment(ident, head_rule="map")]:
        assert c(out, out, mask).item() == 0.0, c
        assert len(list(c.parameters())) == 0
    assert FeatureAlignment(48, 48, ident, loss="nmse")(out, out, mask).item() == 0.0
    assert abs(FeatureAlignment(48, 48, ident, loss="cosine")(out, out, mask).item()) < 1e-6


def test_contrastive_aligned_below_random():
    torch.manual_seed(0)
    B = 8
    hT = tuple(torch.randn(B, 10, 16) for _ in range(3))
    o = types.SimpleNamespace(hidden_states=hT)
    ca = ContrastiveAlignment(16, 16)
    aligned = ca(o, o).item()
    rand = [ca(types.SimpleNamespace(hidden_states=tuple(torch.randn_like(h) for h in hT)), o).item() for _ in range(10)]
    assert aligned < 0.05 and sum(rand) / len(rand) > math.log(B) - 0.2


# --- gradients ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(9))
def test_gradients_reach_student_and_projections(pair, i):
    teacher, student, ids, am = pair
    c = components(student, teacher)[i]
    with torch.no_grad(): t_out = fwd(teacher, ids, am)
    student.zero_grad()
    loss = c(fwd(student, ids, am), t_out, am.bool())
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    for p in c.parameters(): assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    if not isinstance(c, AttentionAlignment): assert len(list(c.parameters())) > 0   # widths differ -> projections


# --- masks --------------------------------------------------------------------------------------------------------

def test_padded_tokens_do_not_change_any_loss(pair):
    teacher, student, ids, am = pair
    mask = am.bool()
    ids2 = ids.masked_fill(~mask, 5)
    with torch.no_grad():
        s1, t1, s2, t2 = fwd(student, ids, am), fwd(teacher, ids, am), fwd(student, ids2, am), fwd(teacher, ids2, am)
        for c in components(student, teacher):
            a, b = c(s1, t1, mask), c(s2, t2, mask)
            assert torch.allclose(a, b, atol=1e-5), (c, a, b)


def nan_pads(out, mask):
    pad = ~mask
    return types.SimpleNamespace(
        hidden_states=tuple(h.masked_fill(pad[..., None], float("nan")) for h in out.hidden_states),
        attentions=tuple(a.masked_fill(pad[:, None, :, None] | pad[:, None, None, :], float("nan")) for a in out.attentions))


def test_nan_in_pads_never_leaks(pair):
    teacher, student, ids, am = pair
    mask = am.bool()
    with torch.no_grad(): t_out = fwd(teacher, ids, am)
    for c in components(student, teacher):
        student.zero_grad()
        ref = c(fwd(student, ids, am), t_out, mask)
        loss = c(nan_pads(fwd(student, ids, am), mask), nan_pads(t_out, mask), mask)
        assert torch.allclose(ref, loss, atol=1e-5), c
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None), c


def test_all_masked_is_zero_with_finite_grad(pair):
    teacher, student, ids, am = pair
    with torch.no_grad(): t_out = fwd(teacher, ids, am)
    none = torch.zeros_like(am, dtype=torch.bool)
    for c in components(student, teacher):
        student.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = c(fwd(student, ids, am), t_out, none)
        assert loss.item() == 0.0, c
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in [*student.parameters(), *c.parameters()] if p.grad is not None)


def test_contrastive_single_sequence_warns(pair):
    teacher, student, ids, am = pair
    c = ContrastiveAlignment.from_models(student, teacher)
    one = torch.zeros_like(am, dtype=torch.bool); one[0] = True
    with pytest.warns(UserWarning, match="at least 2"):
        assert c(fwd(student, ids, am), fwd(teacher, ids, am), one).item() == 0.0


def test_fp32_under_autocast(pair):
    teacher, student, ids, am = pair
    with torch.no_grad(): t_out = fwd(teacher, ids, am)
    half = lambda o: types.SimpleNamespace(hidden_states=tuple(h.bfloat16() for h in o.hidden_states),
                                           attentions=tuple(a.bfloat16() for a in o.attentions))
    s_out = fwd(student, ids, am)
    for c in components(student, teacher):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = c(half(s_out), half(t_out), am.bool())
        assert loss.dtype == torch.float32 and torch.isfinite(loss), c


def test_half_precision_projections_still_compute_in_fp32(pair):
    teacher, student, ids, am = pair
    with torch.no_grad(): t_out = fwd(teacher, ids, am)
    s_out = fwd(student, ids, am)
    for c in components(student, teacher):
        ref = c(s_out, t_out, am.bool())
        loss = c.to(torch.bfloat16)(s_out, t_out, am.bool())     # e.g. cast along with a bf16 student
        assert loss.dtype == torch.float32
        assert torch.allclose(loss, ref, rtol=0.05, atol=1e-3), c


# --- errors -------------------------------------------------------------------------------------------------------

def test_shapes_that_cannot_align(pair):
    teacher, student, ids, am = pair
    mask = am.bool()
    s_out, t_out = fwd(student, ids, am), fwd(teacher, ids, am)
    cases = [
        (lambda: FeatureAlignment(32, 64, [1, 3])(s_out, t_out, mask), "teacher_hidden=64"),
        (lambda: LayerAlignment(32, 48, [1, 4])(s_out, t_out, mask), "layer 4 of `teacher_out`, which has 4 layers"),
        (lambda: FeatureAlignment(32, 48, {3: 1})(s_out, t_out, mask), "layer 3 of `student_out`"),
        (lambda: FeatureAlignment(32, 48, [1, 3])(s_out, t_out, mask[:, :4]), "`mask` must be a [B, S] = [4, 12]"),
        (lambda: FeatureAlignment(32, 48, [1, 3])(s_out, fwd(teacher, ids[:, :6], am[:, :6]), mask), "must share [B, S]"),
        (lambda: AttentionAlignment([1, 3], head_rule="map")(s_out, t_out, mask), "student has 4 heads, teacher has 6"),
        (lambda: AttentionAlignment([1, 3])(s_out, fwd(teacher, ids[:, :6], am[:, :6]), mask), "same B and S"),
        (lambda: AttentionAlignment([1, 3])(types.SimpleNamespace(attentions=()), t_out, mask), "ensure_attentions"),
        (lambda: FeatureAlignment(32, 48, [1, 3])(types.SimpleNamespace(hidden_states=None), t_out, mask), "output_hidden_states=True"),
        (lambda: ContrastiveAlignment(32, 48, teacher_layer=7)(s_out, t_out, mask), "layer 7 of `teacher_out`"),
        (lambda: ContrastiveAlignment(32, 48, tau=-1.0), "`tau` must be a positive number"),
        (lambda: FeatureAlignment(32, 48, "uniform"), "layer_map(m, n, 'uniform')"),
        (lambda: FeatureAlignment(32, 48, [1, 3], loss="huber"), "`loss` must be one of"),
        (lambda: alignment_components(student, teacher, ["kd"]), "got 'kd'"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError) as e: fn()
        assert msg in str(e.value), (msg, str(e.value))


def test_ensure_attentions_switches_sdpa():
    m = tiny(32, 2, 4, attn="sdpa")
    assert m.config._attn_implementation == "sdpa"
    assert ensure_attentions(m) is m and m.config._attn_implementation == "eager"
    ids = torch.randint(0, 64, (2, 6))
    assert len(m(input_ids=ids, output_attentions=True).attentions) == 2
    with pytest.raises(ValueError, match="PreTrainedModel"): ensure_attentions(torch.nn.Linear(2, 2))


def test_alignment_components_protocol(pair):
    teacher, student, *_ = pair
    comps = alignment_components(student, teacher, feat=dict(loss="cosine"), attn=dict(head_rule="average"))
    assert [c.name for c in comps] == ["feat", "layer", "attn", "contr"]
    assert [(c.needs_hidden_states, c.needs_attentions) for c in comps] == [(True, False), (True, False), (False, True), (True, False)]
    assert all(isinstance(c, torch.nn.Module) for c in comps)


# --- the Distiller path -------------------------------------------------------------------------------------------

def test_distiller_fit_with_components(tmp_path):
    distiller = pytest.importorskip("kdlit.distiller")
    from kdlit.data import byte_tokenizer, make_loaders
    from kdlit.schedules import Curriculum
    tok = byte_tokenizer()
    def llama(hidden, layers, heads, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                            max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.eos_token_id, bos_token_id=None))
    teacher, student = llama(48, 4, 6, 1), llama(32, 2, 4, 2)       # both on SDPA: the Distiller must switch them
    dls = make_loaders(tok, ["The quick brown fox jumps over the lazy dog. " * 40], block_size=16, batch_size=4, n_valid=2)
    comps = alignment_components(student, teacher, feat=dict(loss="cosine"), contr=dict(proj_dim=8))
    before = {n: p.detach().clone() for c in comps for n, p in c.named_parameters(prefix=c.name)}
    d = distiller.Distiller(teacher, student, dls, components=comps,
                            curriculum=Curriculum(feat=0.5, layer=0.5, attn=0.5, contr=0.5),
                            verbose=False, cbs=[distiller.EvalCB(at_start=False), distiller.ProgressCB(bar=False)])
    assert teacher.config._attn_implementation == "eager" and student.config._attn_implementation == "eager"
    in_opt = {id(p) for g in d.opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for c in comps for p in c.parameters())        # projections are trained
    d.fit(3)
    for row in d.history:
        for k in ("feat", "layer", "attn", "contr"):
            assert math.isfinite(row[k]) and row[f"w_{k}"] == 0.5
            assert row[f"{k}_weighted"] == pytest.approx(0.5 * row[k])
    after = {n: p.detach() for c in comps for n, p in c.named_parameters(prefix=c.name)}
    assert before and all(not torch.equal(before[n], after[n]) for n in before)   # and they moved
    out = d.save_pretrained(tmp_path / "student")
    from safetensors.torch import load_file
    saved = load_file(next(out.glob("*.safetensors")))
    assert not any("proj." in k and not k.startswith("model.") for k in saved)
    assert set(saved) <= set(student.state_dict())                              # the student's weights, nothing else
    assert not any(k.startswith(("feat", "layer.", "attn", "contr")) for k in saved)
