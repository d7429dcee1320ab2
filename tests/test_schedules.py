"Tests of kdlit.schedules: schedule kinds, specs and round trips, the temperature and loss-weight curricula."
import json, math

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

from kdlit.schedules import (SCHEDULES, DEFAULT_WEIGHTS, Curriculum, Schedule, TemperatureSchedule, combine, constant,
                             cosine, exponential, linear, make_schedule, piecewise, plot_curriculum, plot_softened,
                             softened_stats, steps, temperature_explorer, warmup)

SEED_LINE = "[CURRICULUM] Step 5000 (20%): kd=0.700, feat=0.033, attn=0.033, layer=0.000, contr=0.000"
SEED_TABLE = [(0, 2.0), (10, 1.95), (20, 1.90), (25, 1.875), (40, 1.80), (50, 1.75), (60, 1.70), (75, 1.625),
              (80, 1.60), (100, 1.5)]

def json_round_trip(x): return json.loads(json.dumps(x))

# --- the seed's numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pct,T", SEED_TABLE)
def test_seed_temperature_table(pct, T):
    ts = TemperatureSchedule()
    assert ts(pct / 100) == pytest.approx(T, abs=1e-12)
    assert ts(pct / 100) ** 2 == pytest.approx(T * T, abs=1e-12)

def test_seed_temperature_quarters_exact():
    ts = TemperatureSchedule()
    assert [ts(p) for p in (0, 0.25, 0.5, 0.75, 1)] == [2.0, 1.875, 1.75, 1.625, 1.5]
    assert ts == TemperatureSchedule(2.0, 1.5, "linear") == TemperatureSchedule(schedule=("linear", 2.0, 1.5))

def test_seed_log_line_byte_identical():
    assert Curriculum.seed().log_line(5000, 25000) == SEED_LINE
    assert Curriculum.seed().log_line(1000, 5000) == SEED_LINE.replace("Step 5000", "Step 1000")

def test_seed_curriculum_over_the_run():
    cur = Curriculum.seed()
    assert cur(0.0) == dict(kd=0.5, lm=0.0, feat=0.1, attn=0.1, layer=0.0, contr=0.0)
    assert cur(1.0) == DEFAULT_WEIGHTS
    w = cur(0.2)
    assert w["kd"] == pytest.approx(0.7) and w["feat"] == pytest.approx(0.1 / 3) == w["attn"]
    kds = [cur(p / 100)["kd"] for p in range(101)]
    assert kds == sorted(kds)                                  # kd never decreases

# --- every kind at its knots and end points --------------------------------------------------------------------
def test_constant():
    s = constant(0.3)
    assert [s(0), s(0.5), s(1), s(-1), s(2)] == [0.3] * 5
    assert s.to_spec() == 0.3 and make_schedule(0.3) == s

@pytest.mark.parametrize("cls", [linear, cosine, exponential])
def test_two_point_kinds_end_points_exact(cls):
    for a, b in [(2.0, 1.5), (0.1, 0.7), (4.0, 1.0), (1.0, 100.0)]:
        s = cls(a, b)
        assert (s(0), s(1)) == (a, b)
        assert (s(-5), s(5)) == (a, b)                          # clamped

def test_midpoints():
    assert linear(0.5, 1.0)(0.5) == 0.75
    assert cosine(4.0, 1.0)(0.5) == pytest.approx(2.5)
    assert cosine(4.0, 1.0)(0.25) == pytest.approx(1.0 + 3.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert exponential(4.0, 1.0)(0.5) == pytest.approx(2.0)
    assert exponential(1.0, 1000.0)(1 / 3) == pytest.approx(10.0)

def test_piecewise_and_steps_at_knots_and_between():
    knots = [(0, 1.0), (0.5, 2.0), (1, 0.0)]
    pw, st = piecewise(knots), steps(knots)
    for p, v in knots: assert pw(p) == v and st(p) == v
    assert pw(0.25) == pytest.approx(1.5) and pw(0.75) == pytest.approx(1.0)
    assert st(0.25) == 1.0 and st(0.4999) == 1.0 and st(0.75) == 2.0 and st(0.9999) == 2.0

def test_knots_inside_the_range_hold_outside():
    pw, st = piecewise([(0.2, 5.0), (0.6, 1.0)]), steps([(0.2, 5.0), (0.6, 1.0)])
    assert [pw(0), pw(0.2), pw(0.6), pw(1)] == [5.0, 5.0, 1.0, 1.0]
    assert pw(0.4) == pytest.approx(3.0)
    assert [st(0), st(0.19), st(0.2), st(0.59), st(0.6), st(1)] == [5.0, 5.0, 5.0, 5.0, 1.0, 1.0]
    assert pw.knots() == [0.0, 0.2, 0.6, 1.0]

def test_warmup():
    s = warmup(1.0, frac=0.5, start=0.5)
    assert [s(0), s(0.5), s(0.75), s(1)] == [0.5, 1.0, 1.0, 1.0]
    assert s(0.25) == pytest.approx(0.75)
    assert warmup(2.0)(0.05) == pytest.approx(1.0)              # default: from 0 over the first 10 %
    assert warmup(1.0, frac=0.0)(0.0) == 1.0
    assert warmup(1.0, frac=1.0)(1.0) == 1.0

def test_combine():
    s = combine([0.3, 0.7], [linear(0.0, 1.0), cosine(1.0, 0.0)])
    assert [s(0), s(0.3), s(1)] == [0.0, 1.0, 0.0]
    assert s(0.15) == pytest.approx(0.5) and s(0.65) == pytest.approx(0.5)
    assert s.knots() == [0.0, 0.3, 1.0]
    nested = combine([0.5, 0.5], [("steps", [(0, 1.0), (0.5, 2.0)]), 3.0])
    assert [nested(0), nested(0.24), nested(0.25), nested(0.5), nested(1)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert 0.25 in nested.knots()

def test_every_kind_is_registered():
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "exponential", "piecewise", "steps", "warmup", "combine"}
    assert all(issubclass(c, Schedule) for c in SCHEDULES.values())

# --- specs, dicts and round trips ----------------------------------------------------------------------------
ZOO = [constant(0.3), linear(0.5, 1.0), cosine(0.1, 0.0), exponential(4.0, 1.0),
       piecewise([(0, 1.0), (0.5, 2.0), (1, 0.0)]), steps([(0, 1.0), (0.5, 2.0)]), warmup(1.0, 0.2, 0.1),
       combine([0.3, 0.7], [("linear", 0, 1), ("cosine", 1, 0)])]

@pytest.mark.parametrize("s", ZOO, ids=lambda s: s.kind)
def test_spec_round_trip(s):
    back = make_schedule(json_round_trip(s.to_spec()))
    assert back == s and type(back) is type(s)
    assert back.sample(21) == s.sample(21)
    assert eval(repr(s)) == s

def test_spec_forms():
    assert make_schedule(("linear", 0.5, 1.0)) == make_schedule(["linear", 0.5, 1.0]) == linear(0.5, 1.0)
    assert make_schedule({"kind": "linear", "start": 0.5, "end": 1.0}) == linear(0.5, 1.0)
    assert make_schedule(("cosine", 0.1, 0.0)) == cosine(0.1, 0.0)
    assert make_schedule(("piecewise", [(0, 1.0), (0.5, 2.0), (1, 0.0)])) == piecewise([[0, 1], [0.5, 2], [1, 0]])
    assert make_schedule(("warmup", 1.0, 0.5, 0.5)) == warmup(1.0, frac=0.5, start=0.5)
    assert make_schedule({"kind": "warmup", "value": 1.0, "frac": 0.5}) == warmup(1.0, 0.5)
    assert make_schedule({"kind": "constant", "value": 2}) == constant(2.0) == make_schedule(2)
    s = linear(0, 1)
    assert make_schedule(s) is s

def test_curriculum_from_dict_and_round_trip():
    d = {"kd": ("linear", 0.5, 1.0), "lm": 0.3, "feat": ("cosine", 0.1, 0.0)}
    cur = Curriculum.from_dict(d)
    assert cur == Curriculum(d) == Curriculum(**d)
    assert cur.names == ("kd", "lm", "feat", "attn", "layer", "contr")
    assert cur(0) == dict(kd=0.5, lm=0.3, feat=0.1, attn=0.0, layer=0.0, contr=0.0)
    assert Curriculum.from_dict(json_round_trip(cur.to_spec())) == cur
    fresh = Curriculum()
    fresh.load_state_dict(json_round_trip(cur.state_dict()))
    assert fresh == cur
    seed = Curriculum.seed()
    assert Curriculum.from_dict(json_round_trip(seed.to_spec())).log_line(5000, 25000) == SEED_LINE

def test_curriculum_defaults_and_custom_names():
    assert Curriculum()(0.5) == DEFAULT_WEIGHTS == dict(kd=1.0, lm=0.0, feat=0.0, attn=0.0, layer=0.0, contr=0.0)
    assert Curriculum(feat=0.1)(0.5)["kd"] == 1.0
    assert Curriculum(kd=0.0)(0.5)["kd"] == 0.0
    cur = Curriculum(rank=("warmup", 0.2, 0.5), lm=0.25)
    assert cur.names[-1] == "rank" and set(cur(1)) == {*DEFAULT_WEIGHTS, "rank"}
    assert cur.log_line(50, 100) == ("[CURRICULUM] Step 50 (50%): kd=1.000, feat=0.000, attn=0.000, layer=0.000, "
                                     "contr=0.000, lm=0.250, rank=0.200")
    assert cur["rank"] == warmup(0.2, 0.5)

def test_log_line_clamps_and_formats():
    cur = Curriculum(kd=("linear", 0.0, 1.0))
    assert cur.log_line(0, 100).startswith("[CURRICULUM] Step 0 (0%): kd=0.000")
    assert cur.log_line(150, 100).startswith("[CURRICULUM] Step 150 (100%): kd=1.000")
    assert "-0.000" not in Curriculum(feat=("linear", 0.1, 0.0)).log_line(100, 100)

def test_temperature_any_schedule():
    assert TemperatureSchedule(3.0, kind="constant")(0.4) == 3.0
    assert TemperatureSchedule(schedule=3.0) == TemperatureSchedule(3.0, kind="constant")
    assert TemperatureSchedule(4.0, 1.0, "cosine")(0.5) == pytest.approx(2.5)
    assert TemperatureSchedule(4.0, 1.0, "exponential")(0.5) == pytest.approx(2.0)
    ts = TemperatureSchedule(schedule=("piecewise", [(0, 3.0), (0.1, 2.0), (1, 1.0)]))
    assert TemperatureSchedule.from_spec(json_round_trip(ts.to_spec())) == ts
    assert TemperatureSchedule(schedule=ts) == ts
    fresh = TemperatureSchedule()
    fresh.load_state_dict(json_round_trip(ts.state_dict()))
    assert fresh == ts and fresh(0.1) == 2.0

# --- bad input: ValueError at construction, naming the component and the value ---------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: Curriculum(feat=-0.1), r"Curriculum weight 'feat' must be >= 0.*-0\.1"),
    (lambda: Curriculum(attn=("linear", 0.1, -0.1)), r"'attn'.*gives -0\.1 at p=1\.0"),
    (lambda: Curriculum(lm=("piecewise", [(0, 0.0), (0.5, -2.0), (1, 0.0)])), r"'lm'.*-2\.0 at p=0\.5"),
    (lambda: Curriculum(contr=("combine", [0.5, 0.5], [0.0, ("linear", 0.0, -1.0)])), r"'contr'.*-1\.0 at p=1\.0"),
    (lambda: Curriculum(kd=("sigmoid", 0, 1)), r"Curriculum weight 'kd': unknown schedule kind 'sigmoid'"),
    (lambda: Curriculum.from_dict({"kd": {"kind": "cosin", "start": 1, "end": 0}}), r"'kd'.*'cosin'"),
    (lambda: Curriculum(lm=("piecewise", [(0.5, 1.0), (0.2, 0.0)])),
     r"'lm': piecewise knots must be strictly increasing in p: knot 1 has p=0\.2"),
    (lambda: Curriculum(lm=("steps", [(0.5, 1.0), (0.5, 0.0)])), r"'lm': steps knots must be strictly increasing"),
    (lambda: Curriculum(contr=("steps", [(0, 1.0), (1.2, 0.0)])), r"'contr': steps knot 1 p must lie in \[0, 1\], got 1\.2"),
    (lambda: Curriculum(feat=("piecewise", [(-0.1, 1.0)])), r"'feat': piecewise knot 0 p must lie in \[0, 1\], got -0\.1"),
    (lambda: Curriculum(feat=("piecewise", [])), r"'feat': piecewise knots must be a non-empty list"),
    (lambda: Curriculum(feat=("piecewise", [(0, 1, 2)])), r"'feat': piecewise knot 0 must be a \(p, value\) pair"),
    (lambda: Curriculum(layer=("exponential", 0.0, 1.0)), r"'layer': exponential start must be > 0.*got 0\.0"),
    (lambda: Curriculum(feat=float("nan")), r"'feat': constant value must be a finite number, got nan"),
    (lambda: Curriculum(feat="0.1"), r"'feat': a schedule spec must be"),
    (lambda: Curriculum(kd=("linear", 0.5)), r"'kd': bad arguments for schedule kind 'linear'"),
    (lambda: Curriculum(kd=("warmup", 1.0, 1.5)), r"'kd': warmup frac must lie in \[0, 1\], got 1\.5"),
    (lambda: Curriculum(kd=("combine", [0.5, 0.6], [0, 1])), r"'kd': combine pcts must sum to 1"),
    (lambda: Curriculum(kd=("combine", [0.5, 0.5], [0])), r"'kd': combine needs one schedule per pct"),
    (lambda: Curriculum({"bad name": 1.0}), r"'bad name'"),
    (lambda: Curriculum({"kd": 1.0}, kd=0.5), r"given twice"),
    (lambda: Curriculum([("kd", 1.0)]), r"must be a dict"),
    (lambda: Curriculum().log_line(10, 0), r"total must be .*got 0"),
    (lambda: TemperatureSchedule(2.0, 0.0), r"temperature must stay > 0 .*T=0\.0 at p=1\.0"),
    (lambda: TemperatureSchedule(2.0, -1.0, "cosine"), r"temperature must stay > 0 .*T=-1\.0 at p=1\.0"),
    (lambda: TemperatureSchedule(schedule=("piecewise", [(0, 2.0), (0.5, -1.0), (1, 2.0)])), r"T=-1\.0 at p=0\.5"),
    (lambda: TemperatureSchedule(schedule=("piecewise", [(0, 2.0), (0.4321, 0.0), (1, 2.0)])), r"T=0\.0 at p=0\.4321"),
    (lambda: TemperatureSchedule(schedule=0.0), r"T=0\.0"),
    (lambda: TemperatureSchedule(kind="sigmoid"), r"TemperatureSchedule kind must be one of .*got 'sigmoid'"),
    (lambda: TemperatureSchedule(schedule=("exponential", 2.0, -1.0)), r"temperature schedule: exponential end must be > 0.*got -1\.0"),
    (lambda: TemperatureSchedule(schedule=("linaer", 2.0, 1.0)), r"temperature schedule: unknown schedule kind 'linaer'"),
    (lambda: make_schedule(True), r"got True"),
    (lambda: make_schedule([0.3, 0.7]), r"a schedule spec must be"),
    (lambda: make_schedule({"start": 1}), r"a schedule spec must be"),
    (lambda: linear(0, 1)(float("nan")), r"progress p must be a finite number, got nan"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match): make()

def test_dense_check_catches_a_dip_between_grid_points():
    # the dip sits at a knot that is not on the 1001-point grid: found because knots are probed too
    with pytest.raises(ValueError, match=r"p=0\.12345"):
        Curriculum(feat=("piecewise", [(0, 0.1), (0.1234, 0.1), (0.12345, -1e-3), (0.1235, 0.1)]))

# --- softened statistics, plots, explorer ---------------------------------------------------------------------
def test_softened_stats_high_temperature_limit():
    torch.manual_seed(0)
    zt, zs = torch.randn(3, 500, dtype=torch.float64) * 2, torch.randn(3, 500, dtype=torch.float64) * 2
    limit = ((zt - zs).var(-1, unbiased=False) / 2).mean().item()
    assert softened_stats(zt, zs, 200.0)["t2kl"] == pytest.approx(limit, rel=1e-2)
    assert softened_stats(zt, zt, 2.0)["kl"] == pytest.approx(0.0, abs=1e-9)
    s1, s4 = softened_stats(zt, zs, 1.0), softened_stats(zt, zs, 4.0)
    assert s4["entropy"] > s1["entropy"] and s4["kl"] < s1["kl"]
    with pytest.raises(ValueError, match="temperature must be > 0"): softened_stats(zt, zs, 0)
    with pytest.raises(ValueError, match="student_logits must have the teacher's shape"): softened_stats(zt, zs[:, :5])

def test_plots_and_explorer_build():
    fig = plot_curriculum(Curriculum.seed(), TemperatureSchedule())
    assert len(fig.axes) == 3
    fig = plot_curriculum({"kd": 1.0})
    assert len(fig.axes) == 1
    zt = torch.randn(4, 40); zs = zt + torch.randn(4, 40)
    fig = plot_softened(zt, zs, 3.0, k=6)
    assert len(fig.axes[0].patches) == 12 and fig.axes[0].get_title().startswith("T = 3.00")
    assert plot_softened(zt, zs, 3.0, k=6, log=True).axes[0].get_yscale() == "log"
    ex = temperature_explorer(zt, zs, k=6, temperature=1.5, log=True)
    assert ex.children[0].value == 1.5 and ex.children[1].value is True
    plt.close("all")
