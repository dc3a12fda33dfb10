"""README's "Results at a glance" against the committed tables it quotes (PySDM's test_table_1 habit).

Each row of the README table is rebuilt from the committed `figures/*.csv` (and, for
the benchmark rows, the committed `bench/results/*.json`) at the precision the README prints, and
must appear verbatim in the row's "what" and "ours" cells. Every other number left in those cells
must be a label (model names, bit widths, option numbers) or be listed in UNSOURCED with the
reason it has no table behind it. The "paper" column holds the papers' numbers and is not checked.
"""
import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![A-Za-z\-])\d+(?:[.,]\d+)*")


def _rows() -> dict:
    """``{first words of "what": "what" + " | " + "ours"}`` of the README's results table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results at a glance", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] not in ("what", "---"):
            rows[cells[0]] = f"{cells[0]} | {cells[1]}".replace("\\|", "|")
    return rows


def _csv(name: str) -> list[dict]:
    with open(ROOT / "figures" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def _one(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"{match}: {len(found)} rows"
    return found[0]


def _bench(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def f2(x) -> str:
    return f"{float(x):.2f}"


def f1(x) -> str:
    return f"{float(x):.1f}"


def f0(x) -> str:
    return f"{float(x):.0f}"


def _acc(cell: str) -> str:
    """The top-1 in parentheses of a degradation cell ``"0.52 ± 0.11 (90.07)"``."""
    return re.search(r"\(([-\d.]+)\)", cell).group(1)


def _std(cell: str) -> str:
    return re.search(r"± ([\d.]+)", cell).group(1)


def row_fp():
    t = _csv("fp_baselines")
    acc = {(r["model"], r["data set"]): r["top-1 (re-evaluated)"] for r in t}
    assert all(r["test images"] == "10000" for r in t)  # "full test sets"
    return [f"LeNet-5/MNIST {f2(acc['lenet5', 'mnist'])} %", f"LeNet-5/Fashion-MNIST {f2(acc['lenet5', 'fashion-mnist'])} %",
            f"ResNet-20/Fashion-MNIST {f2(acc['resnet20', 'fashion-mnist'])} %"], ["LeNet-5", "ResNet-20"]


def row_universal_counts():
    t = _csv("sq_table1_universal_sets")
    assert all(r["|S_U|"] == r["paper |S_U|"] and r["QPS 4-bit"] == r["paper QPS 4-bit"] for r in t)  # "exact"
    return ["/".join(r["|S_U|"] for r in t) + " and " + "/".join(r["QPS 4-bit"] for r in t) + ": exact"], \
        ["options 1-5", "4-bit"]


def row_universal_options():
    t = [r for r in _csv("sq_supp_table2_options") if r["model"] == "resnet20/fashion-mnist" and r["bits"] == "4"]
    assert [r["option"] for r in t] == ["1", "2", "3", "4", "5"]
    assert {r["FP top-1"] for r in t} == {"93.35"}
    err = [float(r["weight error (rel. MSE %)"]) for r in t]
    best = min(range(5), key=err.__getitem__)
    others = [e for i, e in enumerate(err) if i != best]
    return [f"(FP {f2(t[0]['FP top-1'])}, full test set)",
            "top-1 " + " / ".join(f2(r["top-1 wgt. only"]) for r in t),
            f"option {best + 1} has the smallest weight error ({f2(err[best])} % vs {f2(min(others))}-{f2(max(others))} %)",
            "exhaustive search " + " / ".join(f1(r["search (s, ours)"]) for r in t) + " s"], \
        ["options 1-5", "ResNet-20", "W4"]


def row_hw_cost():
    t = _csv("sq_supp_table2_hw_cost")
    assert all(r["match"] == "True" for r in t)  # "exact"
    return ["/".join(r["hw_cost"] for r in t) + ": exact"], ["(4-bit input), options 1-5"]


def row_convergence():
    census, traced = _csv("sq_convergence_census"), _csv("sq_convergence_traced")
    winner = _csv("sq_convergence_winner")
    assert all(r["not converged"] == "0" for r in census)
    runs = sum(int(r["QPS x channel runs"]) for r in census)
    means = [float(r["mean iterations"]) for r in census]
    gaps = [f0(_one(traced, bits=b)["gap > 1e-9 %"]) for b in ("2", "3", "4")]
    changed = sum(r["same QPS wins"] == "False" for r in winner)
    return [f"all {runs:,} runs converged", f"{f1(min(means))}-{f1(max(means))} updates on average",
            f"in {'/'.join(gaps)} % of runs at 2/3/4 bits", f"changes the winning QPS in {changed} of {len(winner)} tensors"], \
        ["(eqs. 8-10), option 5", "ResNet-20", "LeNet-5"]


def _ptq(network: str):
    t2 = {r["method"]: r for r in _csv("sq_table2_weight_only") if r["network"] == network}
    t3 = {r["method"]: r for r in _csv("sq_table3_fully_quantized") if r["network"] == network}
    assert t2["APoT"]["2/32"] == t2["uniform"]["2/32"]  # "APoT/uniform" shares one number
    phrases = [f"FP {f2(t2['SQ weight-only']['FP'])}",
               f"W3: SQ {_acc(t2['SQ weight-only']['3/32'])}, APoT {_acc(t2['APoT']['3/32'])}, "
               f"uniform {_acc(t2['uniform']['3/32'])}",
               f"W2: SQ {_acc(t2['SQ weight-only']['2/32'])}, APoT/uniform {_acc(t2['APoT']['2/32'])}",
               f"with refine W2: SQ {_acc(t2['SQ + refine']['2/32'])} ± {_std(t2['SQ + refine']['2/32'])}, "
               f"uniform {_acc(t2['uniform + refine']['2/32'])} ± {_std(t2['uniform + refine']['2/32'])}"]
    w2a4 = (f"W2A4 with refine: SQ {_acc(t3['SQ + refine']['2/4'])} ± {_std(t3['SQ + refine']['2/4'])}, "
            f"uniform {_acc(t3['uniform + refine']['2/4'])} ± {_std(t3['uniform + refine']['2/4'])}")
    return phrases, w2a4


def row_ptq_lenet():
    phrases, _ = _ptq("lenet5/fashion-mnist")
    return phrases, ["LeNet-5"]


def row_ptq_resnet():
    phrases, w2a4 = _ptq("resnet20/fashion-mnist")
    return phrases + [w2a4], ["ResNet-20"]


def row_mac_exact():
    t = _csv("sq_hw_layer_exactness")
    assert all(r["exact_acc"] == "True" for r in t)
    return [f"all {len(t)} layers exact"], ["ResNet-20 W4A8"]


def row_qrater():
    t = _csv("qrater_table1_resnet20")
    methods = ["MSE", "ACIQ", "KL", "(1) round", "(2) clip", "(3) bias", "(1)+(2)", "(1)+(2)+(3)"]
    assert all(max(methods, key=lambda m: float(r[m])) == "ACIQ" for r in t)  # "the best column at every width"
    fp = {r["FP"] for r in t}
    assert len(fp) == 1
    pairs = ", ".join(f"{r['W/A']} {f2(r['(1)+(2)+(3)'])} vs {f2(r['MSE'])}" for r in t)
    return [f"FP {f2(fp.pop())}", f"(1)+(2)+(3) vs MSE+RTN: {pairs}",
            f"ACIQ is the best column at every width (3/3: {f2(_one(t, **{'W/A': '3/3'})['ACIQ'])})"], \
        ["Q-Rater Table 1", "ResNet-20"]


def row_qps_bench():
    b = _bench("qps_search")
    a, c, ref, prune = b["a_fast_option5"], b["c_fast_option4"], b["b_reference_vs_fast"], b["b_prime_pruning"]
    assert a["all_measured"] and c["all_measured"] and ref["same_qps"] and prune["same_qps_and_loss"]
    assert a["same_result_every_layer"]  # "same result"
    assert a["seconds"] < a["target_seconds"] and c["seconds"] < c["target_seconds"]  # "met"
    qps4 = int(_one(_csv("sq_table1_universal_sets"), option="4")["QPS 4-bit"])
    return [f"option 5: {f1(a['seconds'])} s (target {a['target_seconds']} s: met)",
            f"{f1(a['ratio_old_over_new'])}x faster than the previous exact path ({f1(a['old_seconds'])} s), same result",
            f"{f0(a['ratio_new_over_sort'])}x one sort of the same weights",
            f"option 4 ({qps4:,} QPS): {f0(c['seconds'])} s measured in full (target {c['target_seconds']} s: met)",
            f"fast vs reference on one layer: {f0(ref['ratio_reference_over_fast'])}x, same QPS",
            f"exact branch and bound alone: {f2(prune['ratio'])}x"], ["ResNet-18", "4-bit"]


def row_mac_bench():
    b = _bench("mac")
    assert b["within_target"] and b["worst_ratio"] < b["target_ratio"]
    return [f"worst {f1(b['worst_ratio'])}x wall / {f1(b['worst_cpu_ratio'])}x CPU time",
            f"(target {f0(b['target_ratio'])}x: met)"], []


def row_quantize_bench():
    rows = _bench("quantize")["rows"]
    assert all(r["identical"] for r in rows)  # "bit-identical in float64"
    return [" / ".join(f"{f1(r['ratio'])}x" for r in rows) + " faster at "
            + " / ".join(str(r["points"]) for r in rows) + " points, bit-identical in float64"], \
        ["(SQ eq. 3)", "ResNet-18"]


def row_refine_bench():
    b = _bench("sq_refine")
    rows = b["rows"]
    assert all(r["scales_same"] and r["rounding_same"] for r in rows)  # "bit for bit"
    big = max(rows, key=lambda r: r["C"] * r["K"])
    return [f"largest shape {big['C']}x{big['K']}: scales {f2(big['scales_reference_s'])} s -> "
            f"{f2(big['scales_fast_s'])} s ({f1(big['scales_ratio'])}x)",
            f"rounding {f2(big['rounding_reference_s'])} s -> {f2(big['rounding_fast_s'])} s ({f1(big['rounding_ratio'])}x)",
            f"all {len(rows)} shapes {f1(b['total_reference_s'])} s -> {f1(b['total_fast_s'])} s "
            f"({f1(b['total_reference_s'] / b['total_fast_s'])}x)", f"{b['threads']} threads",
            f"({min(r['C'] for r in rows)}x{min(r['K'] for r in rows)} .. {big['C']}x{big['K']})"], \
        ["ResNet-18", "layer3/4", "float64"]


def row_stlq_fit_bench():
    b = _bench("stlq_fit")
    per_element, per_tile = (_only(b["rows"], lambda r, t=t: (r["tile"] is None) == t) for t in (True, False))
    assert per_element["same"] and per_tile["same"]  # "the same scales bit for bit"
    return [f"({b['grid']}-point grid)",
            f"{per_element['layers']} body layers ({per_element['weights'] / 1e6:.1f} M weights)",
            f"{b['bits']}-bit, select {b['select_ratio'] * 100:.0f} %, {b['threads']} thread",
            f"per element {f1(per_element['torch_s'])} s -> {f1(per_element['kernel_s'])} s ({f1(per_element['ratio'])}x)",
            f"per tile of {per_tile['tile']} {f1(per_tile['torch_s'])} s -> {f1(per_tile['kernel_s'])} s "
            f"({f1(per_tile['ratio'])}x)"], ["ResNet-18"]


def _only(rows, keep):
    found = [r for r in rows if keep(r)]
    assert len(found) == 1, f"{len(found)} rows"
    return found[0]


def _nulsq(name: str):
    """The phrases of a notebook-06 accuracy table: ``"2/2: LSQ 88.83 ± 0.21, nuLSQ-A ..."`` per width."""
    t = _csv(f"nulsq_table_{name}")
    widths = [c for c in t[0] if c != "method"]
    fp = _one(t, method="FP")
    assert len({fp[w] for w in widths}) == 1
    body = [r for r in t if r["method"] != "FP"]
    phrases = [f"{w}: " + ", ".join(f"{r['method']} {r[w].replace('+-', '±')}" for r in body) for w in widths]
    diff = _csv(f"nulsq_diff_to_lsq_{name}")
    outside = sum(r["outside noise"] == "True" for r in diff)
    return phrases + [f"FP {f2(fp[widths[0]])}", f"{outside} of {len(diff)} nuLSQ-vs-LSQ differences outside 2 SE"]


def row_nulsq_resnet():
    return _nulsq("resnet20"), ["nuLSQ vs LSQ", "ResNet-20", "W/A"]


def row_nulsq_lenet():
    return _nulsq("lenet5"), ["nuLSQ vs LSQ", "LeNet-5", "W/A"]


def row_qat_bench():
    b = _bench("qat_step")
    r, t = b["ratios"], b["targets"]
    assert b["fast_equals_reference_loss"]
    met = ["met" if r[k] <= t[k] else "NOT met" for k in ("LSQ / FP", "nuLSQ fast / LSQ")]
    return [f"LSQ {f2(r['LSQ / FP'])}x FP (target {t['LSQ / FP']}x: {met[0]})",
            f"nuLSQ fast {f2(r['nuLSQ fast / LSQ'])}x LSQ (target {t['nuLSQ fast / LSQ']}x: {met[1]})",
            f"nuLSQ reference {f1(r['nuLSQ reference / nuLSQ fast'])}x slower than fast, same first-step loss",
            f"FP {f2(b['seconds_per_step']['FP'])} s"], ["ResNet-20", "W/A 4/4", "batch 128", "1x28x28"]


def row_stlq():
    t = _csv("alq_final_top1")
    fp = _one(_csv("fp_baselines"), model="resnet20", **{"data set": "fashion-mnist"})["top-1 (re-evaluated)"]
    phrases = []
    for w in ("5/5", "3/3"):
        cells = [_one(t, **{"W/A": w, "training": tr, "select ratio": "0.15"})["top-1 deployed"].replace("+-", "±")
                 for tr in ("with select", "without select", "with select, per tile (8)")]
        phrases.append(f"{w}: with select {cells[0]}, without select {cells[1]}, per tile (8) {cells[2]}")
    return phrases + [f"FP {f2(fp)}"], ["STLQ fine-tuning", "ResNet-20", "select ratio 15 %"]


def row_cross_paper():
    t = _csv("cross_paper_fully_quantized")

    def point(wa, method):
        r = _one(t, **{"W/A": wa, "method": method})
        assert r["pareto"] == "True", (wa, method)
        return f"{method} {f2(r['top-1'])} ± {f2(r['std'])} at {f2(r['relative MAC cost'])}x"

    front = {wa: sorted(r["method"] for r in t if r["W/A"] == wa and r["pareto"] == "True")
             for wa in ("4/4", "3/3", "2/4")}
    assert front == {"4/4": ["two_word_log", "uniform + refine"], "3/3": ["sq + refine", "uniform + refine"],
                     "2/4": ["sq + refine", "uniform + refine"]}
    return [f"W4A4: {point('4/4', 'uniform + refine')}, {point('4/4', 'two_word_log')}",
            f"W3A3: {point('3/3', 'uniform + refine')}, {point('3/3', 'sq + refine')}",
            f"W2A4: {point('2/4', 'uniform + refine')}, {point('2/4', 'sq + refine')}"], ["ResNet-20"]


def row_peers():
    resnet, lenet = _csv("cross_paper_weight_only"), _csv("cross_paper_lenet5_weight_only")

    def point(t, wa, method):
        r = _one(t, **{"W/A": wa, "method": method})
        spread = " (one seed" if r["seeds"] == "1" else f" ± {f2(r['std'])} ("
        return f"{method} {f2(r['top-1'])}{spread}{', ' if r['seeds'] == '1' else ''}{f0(r['seconds'])} s)"

    w3_front = [r["method"] for r in resnet if r["W/A"] == "3/FP" and r["pareto"] == "True"]
    assert w3_front == ["AIMET AdaRound (250 it)"]  # "the whole front"
    return ([f"W2: {point(resnet, '2/FP', m)}" if i == 0 else point(resnet, "2/FP", m) for i, m in enumerate(
                ["Brevitas GPTQ", "AIMET AdaRound (250 it)", "AIMET AdaRound (1000 it)", "uniform + refine",
                 "sq + refine"])]
            + [f"W3: {point(resnet, '3/FP', 'AIMET AdaRound (250 it)')}, the whole front"]
            + [f"W2: {point(lenet, '2/FP', m)}" if i == 0 else point(lenet, "2/FP", m) for i, m in enumerate(
                ["Brevitas GPTQ", "AIMET AdaRound (2000 it)", "sq + refine"])]), ["ResNet-20", "LeNet-5"]


# README row (start of "what") -> its check
CHECKS = {
    "FP baselines": row_fp,
    "|S_U| and 4-bit QPS counts": row_universal_counts,
    "universal-set options 1-5": row_universal_options,
    "relative HW cost": row_hw_cost,
    "scale-factor iteration": row_convergence,
    "weight-only PTQ, LeNet-5": row_ptq_lenet,
    "PTQ, ResNet-20": row_ptq_resnet,
    "shift-add MAC bit-exactness": row_mac_exact,
    "Q-Rater Table 1": row_qrater,
    "QPS search": row_qps_bench,
    "MAC simulator vs float conv": row_mac_bench,
    "shared quantizer": row_quantize_bench,
    "SQ final optimisation": row_refine_bench,
    "STLQ scale fit": row_stlq_fit_bench,
    "nuLSQ vs LSQ QAT, ResNet-20": row_nulsq_resnet,
    "nuLSQ vs LSQ QAT, LeNet-5": row_nulsq_lenet,
    "QAT training step": row_qat_bench,
    "STLQ fine-tuning": row_stlq,
    "cross-paper Pareto front": row_cross_paper,
    "peer libraries": row_peers,
}

# numbers in the README with no committed table behind them: (row, exact text, why)
UNSOURCED = [
    ("weight-only PTQ, LeNet-5", "5 calibration seeds", "the seed count is in notebook 03's profile, not in a CSV"),
    ("PTQ, ResNet-20", "first 2000 test images", "notebook 03's test size is in its profile, not in the CSV"),
    ("PTQ, ResNet-20", "5 calibration seeds", "the seed count is in notebook 03's profile, not in a CSV"),
    ("shift-add MAC bit-exactness", "10000/10000 identical predictions",
     "printed by notebook 04 from the data/derived cache sq_hw_int_vs_fake_logits; no CSV"),
    ("Q-Rater Table 1", "first 2000 test images",
     "in the note of figures/qrater_table1_resnet20.md, not in its CSV"),
    ("nuLSQ vs LSQ QAT, ResNet-20", "10000 test images, 3 seeds, 2 epochs on 3840 training images",
     "notebook 06's profile, in the note of figures/nulsq_table_resnet20.md"),
    ("nuLSQ vs LSQ QAT, LeNet-5", "10000 test images, 3 seeds, 2 epochs on 10000 training images",
     "notebook 06's profile, in the note of figures/nulsq_table_lenet5.md"),
    ("STLQ fine-tuning", "deployed, 10000 test images, 3 seeds, 4 epochs on 3840 training images",
     "notebook 07's profile, in the note of figures/alq_final_top1.md"),
]


def _row(key: str) -> str:
    rows = _rows()
    found = [text for what, text in rows.items() if what.replace("\\|", "|").startswith(key)]
    assert len(found) == 1, f"README results row starting {key!r}: found {len(found)}"
    return found[0]


def test_every_readme_row_has_a_check():
    rows = _rows()
    assert len(rows) == len(CHECKS)
    for what in rows:
        assert sum(what.replace("\\|", "|").startswith(k) for k in CHECKS) == 1, what


@pytest.mark.parametrize("key", list(CHECKS))
def test_readme_numbers_equal_the_committed_tables(key):
    text = _row(key)
    phrases, labels = CHECKS[key]()
    missing = [p for p in phrases if p not in text]
    assert not missing, f"README row {key!r} does not say what the tables say:\n  " + "\n  ".join(missing) + \
        f"\nREADME: {text}"
    rest = text
    for p in sorted(phrases + labels + [u for k, u, _ in UNSOURCED if k == key], key=len, reverse=True):
        assert p in text, f"{p!r} not in README row {key!r}"
        rest = rest.replace(p, " ")
    stray = NUMBER.findall(rest)
    assert not stray, f"README row {key!r} has numbers no check covers: {stray} (left: {rest!r})"
