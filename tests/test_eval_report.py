"""Reports from a hand-made three-language results file, --compare, and robustness to bad lines."""

from __future__ import annotations

import csv
import json
import struct

import pytest

from esrt_jax import metrics
from esrt_jax.cli import eval as cli
from esrt_jax.eval import compare, report, results
from test_eval_metrics import LANGS3, SENTS, make_records, write_jsonl


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    write_jsonl(d / "results.jsonl", make_records())
    rc = cli.main(["--score", str(d / "results.jsonl"), "--out", str(d / "out")])
    assert rc == 0
    return d / "out"


def test_summary_and_directions(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["languages"] == list(LANGS3)
    assert summary["n_directions"] == 3 * 2  # N x (N - 1)
    assert summary["records"] == 54 and summary["skipped_lines"] == 0
    assert summary["issues"]["counts"] == {"empty_hypothesis": 1}
    with open(run / "directions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["src"], r["tgt"]) for r in rows] == [(s, t) for s in LANGS3 for t in LANGS3 if s != t]
    bleu = {(r["src"], r["tgt"]): float(r["bleu"]) for r in rows}
    assert summary["averages"]["bleu"] == pytest.approx(sum(bleu.values()) / 6, abs=0.01)
    for lang in LANGS3:
        out_mean = sum(v for (s, _), v in bleu.items() if s == lang) / 2
        in_mean = sum(v for (_, t), v in bleu.items() if t == lang) / 2
        assert summary["per_source"][lang]["bleu"] == pytest.approx(out_mean, abs=0.01)
        assert summary["per_target"][lang]["bleu"] == pytest.approx(in_mean, abs=0.01)
    assert {r["bleu_tokenize"] for r in rows if r["tgt"] == "cmn"} == {"char"}
    assert set(summary["asr"]) == set(LANGS3) and summary["asr"]["cmn"]["metric"] == "cer"
    assert summary["signatures"]["bleu_13a"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert summary["spbleu"].startswith("spBLEU")


def test_markdown_table_layout(run):
    md = (run / "table.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    i = lines.index("### BLEU (rows = source, columns = target)")
    header, _, *rows = lines[i + 2 : i + 2 + 2 + 4]
    assert header == "| src \\ tgt | deu | eng | cmn | X→all |"
    for k, (lang, row) in enumerate(zip(LANGS3, rows[:3])):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"**{lang}**"
        assert cells[1 + k] == "–"  # diagonal
        assert all(c for j, c in enumerate(cells[1:4]) if j != k)
    assert rows[3].startswith("| all→X |")
    assert "### chrF++ (rows = source, columns = target)" in md and "### ASR" in md


def test_heatmap_and_bar_chart_are_pngs(run):
    assert _png_size(run / "bleu_heatmap.png") == report.heatmap_size(3)
    w, h = _png_size(run / "asr_by_language.png")
    assert w > 100 and h > 100


def test_heatmap_scale_is_fixed_not_stretched_to_the_data():
    nan = float("nan")
    assert report.heatmap_vmax([[nan, 1.7], [0.4, nan]]) == 50.0  # a BLEU of 1.7 stays dark
    assert report.heatmap_vmax([[nan, 63.0], [12.0, nan]]) == 63.0
    assert report.heatmap_vmax([[nan]]) == 50.0


def test_asr_average_names_only_the_metrics_present(tmp_path):
    recs = [r for r in make_records() if "cmn" not in (r["src"], r["tgt"])]  # WER languages only
    write_jsonl(tmp_path / "results.jsonl", recs)
    assert cli.main(["--score", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "out")]) == 0
    line = next(x for x in (tmp_path / "out" / "table.md").read_text().splitlines() if x.startswith("Average: "))
    assert "WER languages" in line and "CER" not in line and " )" not in line, line


def test_terminal_table(tmp_path, capsys):
    write_jsonl(tmp_path / "r.jsonl", make_records())
    assert cli.main(["--score", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "BLEU (rows = source, columns = target)" in out
    assert "3 languages, 6 directions" in out
    assert (tmp_path / "r_scores" / "summary.json").exists()  # default --out


# ----------------------------------------------------------------------------- --compare


def test_compare_counts_wins_and_losses(tmp_path):
    dirs = [(s, t) for s in LANGS3 for t in LANGS3 if s != t]
    # A is near-perfect in the first three directions and poor in two; one direction identical.
    qa = {d: 0.02 for d in dirs[:3]} | {dirs[3]: 0.6, dirs[4]: 0.6, dirs[5]: 0.3}
    qb = {d: 0.6 for d in dirs[:3]} | {dirs[3]: 0.02, dirs[4]: 0.02, dirs[5]: 0.3}
    a_recs, b_recs = make_records(seed=1, quality=qa), make_records(seed=2, quality=qb)
    # identical hypotheses in the last direction -> a tie
    for ra, rb in zip(a_recs, b_recs):
        if (ra["src"], ra["tgt"]) == dirs[5]:
            rb["s2tt_r"] = ra["s2tt_r"]
    write_jsonl(tmp_path / "a.jsonl", a_recs)
    write_jsonl(tmp_path / "b.jsonl", b_recs)
    sa = metrics.score_records(results.read_results(tmp_path / "a.jsonl").records)
    sb = metrics.score_records(results.read_results(tmp_path / "b.jsonl").records)
    c = compare.compare_scores(sa, sb)
    outcome = {(d.src, d.tgt): d.outcome for d in c.deltas}
    assert [outcome[d] for d in dirs] == ["win"] * 3 + ["loss"] * 2 + ["tie"]
    assert (c.wins, c.losses, c.ties) == (3, 2, 1)
    assert "better than B in 3 of 6 directions by BLEU (worse in 2, tied in 1)" in c.sentence()
    for d in c.deltas:
        assert d.delta == pytest.approx(sa.directions[(d.src, d.tgt)].bleu - sb.directions[(d.src, d.tgt)].bleu)
    # the reversed comparison mirrors it
    r = compare.compare_scores(sb, sa)
    assert (r.wins, r.losses, r.ties) == (2, 3, 1)
    # ASR: lower is better
    for d in c.asr:
        assert d.outcome == ("tie" if abs(d.delta) < 0.005 else ("win" if d.delta < 0 else "loss"))

    # the CLI writes the same counts
    assert cli.main(["--score", str(tmp_path / "a.jsonl"), "--compare", str(tmp_path / "b.jsonl"),
                     "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["compare"]["wins"], summary["compare"]["losses"], summary["compare"]["ties"]) == (3, 2, 1)
    with open(tmp_path / "out" / "compare.csv", encoding="utf-8") as f:
        assert [r["outcome"] for r in csv.DictReader(f)] == ["win"] * 3 + ["loss"] * 2 + ["tie"]


def test_compare_partial_overlap(tmp_path):
    recs = make_records()
    write_jsonl(tmp_path / "a.jsonl", recs)
    write_jsonl(tmp_path / "b.jsonl", [r for r in recs if r["tgt"] != "cmn"])
    sa = metrics.score_records(results.read_results(tmp_path / "a.jsonl").records)
    sb = metrics.score_records(results.read_results(tmp_path / "b.jsonl").records)
    c = compare.compare_scores(sa, sb)
    assert len(c.deltas) == 4 and c.ties == 4
    assert sorted(c.only_a) == [("deu", "cmn"), ("eng", "cmn")] and c.only_b == []


# ----------------------------------------------------------------------------- robustness


BAD_LINES = [
    '{"src": "eng", "tgt": "deu", "s2tt": "Hallo Welt", "s2tt_r": "Hallo Welt", "asr": "hello world", "asr_r": "hello world", "id": "1"}',
    "{not json",
    "",  # blank lines are ignored
    "[1, 2, 3]",
    '{"src": "eng", "tgt": "xyz", "s2tt": "a", "s2tt_r": "a"}',
    '{"src": "eng", "tgt": "deu", "s2tt": "Hallo"}',
    '{"src": "eng", "tgt": "deu", "s2tt": "Hallo Welt", "s2tt_r": "", "id": "2"}',
    '{"src": "eng", "tgt": "deu", "s2tt": 5, "s2tt_r": "x"}',
    '{"tgt": "deu", "s2tt": "a", "s2tt_r": "b"}',
    '{"src": "eng", "tgt": "deu", "s2tt": "Hallo Welt", "s2tt_r": "Hallo", "id": "1"}',
    '{"src": "zho", "tgt": "eng", "s2tt": "hello world", "s2tt_r": "hello world", "id": "3"}',
]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(BAD_LINES) + "\n").encode() + b'{"src": "eng", "s2tt": "\xff\xfe"}\n')
    rf = results.read_results(path)
    got = [(i.line, i.kind) for i in rf.issues]
    assert got == [
        (2, "malformed_json"),
        (4, "not_object"),
        (5, "unknown_language"),
        (6, "missing_field"),
        (7, "empty_hypothesis"),
        (8, "bad_field"),
        (8, "missing_field"),
        (9, "missing_field"),
        (10, "duplicate"),
        (12, "malformed_json"),
    ]
    msgs = {i.line: str(i) for i in rf.issues}
    assert msgs[2].startswith("line 2: not valid JSON")
    assert "unknown language code 'xyz'" in msgs[5]
    assert "eng->deu: no s2tt_r" in msgs[6]
    assert "field 's2tt' must be a string, got int" in [i.message for i in rf.issues if i.line == 8][0]
    assert "already on line 1" in msgs[10]
    assert "not UTF-8" in msgs[12]
    assert [(r.line, r.src, r.tgt) for r in rf.records] == [(1, "eng", "deu"), (7, "eng", "deu"), (11, "cmn", "eng")]
    assert rf.n_lines == 11 and rf.n_skipped == 8
    scores = metrics.score_records(rf.records)
    assert set(scores.directions) == {("eng", "deu"), ("cmn", "eng")}
    assert scores.directions[("eng", "deu")].empty_hyps == 1

    # the CLI scores what it can and reports the rest
    assert cli.main(["--score", str(path), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["issues"]["total"] == 10 and summary["skipped_lines"] == 8
    assert (tmp_path / "out" / "issues.txt").read_text().splitlines()[0].startswith("line 2: not valid JSON")


def test_nothing_scorable_and_missing_file(tmp_path, capsys):
    path = tmp_path / "junk.jsonl"
    path.write_text("{broken\n[]\n")
    assert cli.main(["--score", str(path)]) == 1
    err = capsys.readouterr().err
    assert "junk.jsonl: no scorable records in 2 lines (2 issues; first: line 1: not valid JSON" in err
    assert cli.main(["--score", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: results file does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])  # --score is required


def test_original_llm_srt_outputs_are_read(tmp_path):
    """LLM-SRT's inference writes {gt, prompt, response} with the languages only in the tags."""
    lines = [
        {"key": "u1", "prompt": "<|eng|><|zho|>", "gt": "hello world<|eng|><|zho|>你好世界",
         "response": "hello word<|eng|><|zho|>你好世界"},
        {"key": "u2", "prompt": "<|eng|><|zho|>", "gt": "good morning<|eng|><|zho|>早上好",
         "response": "早上好"},  # no separator: as LLM-SRT's scorer, whole text = ASR and translation
        {"key": "u3", "prompt": "hello<|eng|><|deu|>", "gt": "Hallo", "response": "Hallo"},  # SMT
        {"key": "u4", "prompt": "<|jpn|>", "gt": "こんにちは", "response": "こんにちわ"},  # ASR
    ]  # fmt: skip
    write_jsonl(tmp_path / "orig.jsonl", lines)
    rf = results.read_results(tmp_path / "orig.jsonl")
    assert rf.issues == []
    r1, r2, r3, r4 = rf.records
    assert r1.id == "u1"
    assert (r1.src, r1.tgt, r1.asr_ref, r1.ref, r1.asr_hyp, r1.hyp) == (
        "eng", "cmn", "hello world", "你好世界", "hello word", "你好世界")
    assert (r2.hyp, r2.asr_hyp, r2.asr_ref) == ("早上好", "早上好", "good morning")
    assert (r3.src, r3.tgt, r3.ref, r3.hyp) == ("eng", "deu", "Hallo", "Hallo")
    assert (r4.src, r4.tgt, r4.asr_ref, r4.asr_hyp, r4.ref) == ("jpn", "jpn", "こんにちは", "こんにちわ", None)
    scores = metrics.score_records(rf.records)
    assert set(scores.directions) == {("eng", "cmn"), ("eng", "deu")}
    assert scores.asr["jpn"].metric == "cer" and scores.asr["jpn"].error == pytest.approx(20.0)


def test_original_outputs_split_like_the_reference_scorer():
    gt = "hi there<|eng|><|deu|>Hallo"
    rec, _ = results.parse_record({"prompt": "<|eng|><|deu|>", "gt": gt, "response": "hi<|eng|><|deu|>Hallo"}, 1)
    assert (rec.asr_ref, rec.ref, rec.asr_hyp, rec.hyp) == ("hi there", "Hallo", "hi", "Hallo")
    # no marker in the response: LLM-SRT's eval scores the whole text as ASR, the tail as translation
    rec, _ = results.parse_record({"prompt": "<|eng|><|deu|>", "gt": gt, "response": "x<|deu|>Hallo"}, 2)
    assert (rec.asr_hyp, rec.hyp) == ("x<|deu|>Hallo", "Hallo")
    # a gt without the marker is a translation reference only
    rec, _ = results.parse_record({"prompt": "<|eng|><|deu|>", "gt": "Hallo", "response": "Hallo"}, 3)
    assert (rec.asr_ref, rec.ref) == (None, "Hallo")
    assert SENTS  # the shared fixture data is importable
