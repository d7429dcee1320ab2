"Perplexity, its formatting and bands pinned at the seed's numbers and at extreme losses; HealthMonitor rules."
import json, math, warnings

import pytest
import torch

from kdlit.metrics import (HealthMonitor, HealthWarning, describe_ppl, format_ppl, log10_perplexity, perplexity,
                           ppl_band)


@pytest.mark.parametrize("loss,ppl", [(20.0, 485165195.40979), (28.4074, 2.17359e12), (12.0, 162754.791419),
                                      (6.0, 403.428793), (3.0, 20.0855369), (0.0, 1.0)])
def test_perplexity_seed_numbers(loss, ppl):
    assert perplexity(loss) == pytest.approx(ppl, rel=1e-5)
    assert perplexity(torch.tensor(loss, dtype=torch.float64)) == pytest.approx(ppl, rel=1e-5)


def test_perplexity_never_capped():
    # the seed displayed exp(min(loss, 20)); every finite loss up to ln(float max) must be exact
    for loss in (20.0, 20.5, 50.0, 100.0, 500.0, 709.0, 709.78):
        assert perplexity(loss) == math.exp(loss)
    assert perplexity(28.4074) / perplexity(20.0) > 4000


def test_perplexity_extremes():
    assert perplexity(math.inf) == math.inf
    assert perplexity(-math.inf) == 0.0
    assert math.isnan(perplexity(math.nan))
    with pytest.warns(RuntimeWarning, match=r"1\.97e\+434"):
        assert perplexity(1000.0) == math.inf
    assert log10_perplexity(1000.0) == pytest.approx(434.2944819, rel=1e-9)


@pytest.mark.parametrize("loss,text", [(28.4074, "2.17e+12"), (20.0, "4.85e+08"), (12.0, "1.63e+05"),
                                       (3.0, "2.01e+01"), (0.0, "1.00e+00"), (1000.0, "1.97e+434"),
                                       (709.79, "1.81e+308"), (1e4, "8.81e+4342"), (math.inf, "inf"),
                                       (math.nan, "nan")])
def test_format_ppl(loss, text):
    assert format_ppl(loss) == text


def test_format_ppl_agrees_with_float_formatting():
    for loss in [0.1 * i for i in range(0, 7000, 37)]:
        assert format_ppl(loss) == f"{math.exp(loss):.2e}"
    # the log10 path, used beyond the float range, agrees with the exact value just inside it
    l10 = 709.0 / math.log(10); e = math.floor(l10)
    assert f"{10 ** (l10 - e):.2f}e+{e}" == format_ppl(709.0)


def test_ppl_band_boundaries():
    cases = {1.0: "excellent", 19.999: "excellent", 20.0: "good", 99.999: "good", 100.0: "fair", 999.0: "fair",
             1000.0: "poor", 9999.0: "poor", 10_000.0: "broken", 2.17e12: "broken", math.inf: "broken",
             math.nan: "broken"}
    for p, band in cases.items(): assert ppl_band(p) == band, p
    assert ppl_band(perplexity(3.0)) == "good"     # exp(3) = 20.09
    assert ppl_band(perplexity(2.99)) == "excellent"
    with pytest.raises(ValueError, match="ppl"): ppl_band(-1.0)
    assert describe_ppl(28.4074) == "loss 28.4074, ppl 2.17e+12 (broken)"
    assert describe_ppl(1000.0) == "loss 1000.0000, ppl 1.97e+434 (broken)"


def test_health_monitor_replays_run3():
    hm = HealthMonitor(ema_beta=0.5, spike_warmup=2, ppl_after_step=0, on_warn=None)
    for step, tot in {0: 28.19, 100: 22.34, 200: 27.64, 300: 27.60, 400: 22.31, 500: 19.97, 600: 28.34}.items():
        hm.update(step, total=tot, temperature=3.0, expected_temperature=2.0)
    hm.update(436, lm=math.nan, nonfinite=True)
    hm.update(600, ppl=perplexity(28.4074))
    assert hm.first == {"start_loss": 0, "temperature": 0, "spike": 600, "nonfinite": 436, "ppl_high": 600}
    text = hm.summary()
    assert "FIRED" in text and "plateau" in text and "<table>" in hm._repr_html_()


def test_health_monitor_warns_once_per_rule():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hm = HealthMonitor(plateau_window=2)
        for s in range(10): hm.update(s, total=math.inf, kd=1.0)
        for s in range(10, 20): hm.update(s, total=5.0)
    rules = [str(x.message).split("[")[1].split("]")[0] for x in w if issubclass(x.category, HealthWarning)]
    assert sorted(rules) == ["nonfinite", "plateau"]
    assert hm.counts["nonfinite"] == 10 and hm.counts["plateau"] == 8


def test_health_monitor_thresholds_and_callbacks():
    seen = []
    hm = HealthMonitor(start_loss_max=30, spike_frac=0.5, ema_beta=0.5, ppl_max=1e3, ppl_after_step=10,
                       on_warn=lambda step, rule, msg: seen.append((step, rule)))
    hm.update(0, total=28.0)                       # below the raised start threshold
    for s in range(1, 5): hm.update(s, total=10.0)
    hm.update(5, total=14.0)                       # < 50 % above its EMA: no spike
    hm.update(6, total=30.0)                       # spike
    hm.update(9, lm=8.0)                           # ppl 2981 but before step 10
    hm.update(10, lm=8.0)
    hm.update(11, temperature=1.75, expected_temperature=1.75, weights={"kd": 0.7}, expected_weights={"kd": 0.7})
    hm.update(12, temperature=torch.tensor(1.9), expected_temperature=1.75)
    assert seen == [(6, "spike"), (10, "ppl_high"), (12, "temperature")]


def test_health_monitor_state_roundtrip():
    hm = HealthMonitor(plateau_window=3, on_warn=None)
    for s in range(5): hm.update(s, total=5.0 - 0.1 * (s < 2))
    sd = json.loads(json.dumps(hm.state_dict()))
    hm2 = HealthMonitor(plateau_window=3, on_warn=None); hm2.load_state_dict(sd)
    assert hm2.summary() == hm.summary()
    assert hm2.update(5, total=6.0) == hm.update(5, total=6.0)
