"""Understanding benchmarks: loaders for every distributed format, answer rules, scores, reports."""

import json

import pytest

from benchmark_dirs import (
    GMAI_HEADER,
    b64,
    make_gmai,
    make_omnimedvqa,
    make_pathvqa_tsv,
    make_slake,
    make_vqa_rad_json,
    make_vqa_rad_parquet,
)
from unimedvl.evaluation import BenchmarkFileError, evaluate_vqa, load_benchmark, score
from unimedvl.evaluation import answers as A
from unimedvl.evaluation.predictions import PredictionFileError, read_predictions


# ---- answer rules -----------------------------------------------------------------------------------
def test_yes_no_is_judged_by_whole_words_and_disagreements_with_substrings_are_visible():
    assert not A.yes_no_verdict("The scan looks normal", "no")  # "no" inside "normal" is not a "no"
    assert A.yes_no_substring_verdict("The scan looks normal", "no")  # ...but the peer substring rule says it is
    assert A.yes_no_verdict("No, there is no fracture.", "no")
    assert not A.yes_no_verdict("Yes and no", "yes")  # both words: no single answer
    assert A.yes_no_verdict("Final answer: YES", "yes")
    assert A.yes_no_verdict("<think>maybe no</think><answer>yes</answer>", "yes")
    assert A.yes_no_verdict(r"so the result is \boxed{no}", "no")


def test_open_answers_match_after_normalisation_and_recall_counts_multiplicity():
    assert A.exact_match("Lung.", "lung")  # a trailing period and case do not matter
    assert A.exact_match("  left   upper lobe ", "Left upper lobe")
    assert not A.exact_match("the lung", "lung")  # strict: no article stripping
    assert A.open_recall("the left lobe", "left upper lobe") == pytest.approx(2 / 3)
    assert A.open_recall("two nodules", "2 nodules nodules") == pytest.approx(2 / 3)  # number words; multiplicity
    assert A.open_recall("", "lung") == 0.0


def test_llava_closed_rule_and_its_legacy_quirk():
    assert A.llava_closed_verdict("yes, it is", "yes") is True
    assert A.llava_closed_verdict("no", "yes") is False
    assert A.llava_closed_verdict("no", "yes", legacy=True) is None  # left out of the denominator
    assert A.llava_closed_verdict("unclear", "yes", legacy=True) is False  # names neither: wrong
    assert A.llava_closed_verdict("cannot tell", "yes", legacy=True) is None  # plain substrings, as the original: "cannot" holds "no"


def test_multiple_choice_extraction():
    opts = {"A": "Liver", "B": "Kidney", "C": "Spleen"}
    assert A.extract_choice("B", opts) == "B"
    assert A.extract_choice("(C) Spleen.", opts) == "C"
    assert A.extract_choice("A or B", opts) is None  # a reply naming two letters is not an answer
    assert A.extract_choice("It is B, not A. The correct answer is B", opts) == "B"
    assert A.extract_choice("The kidney is abnormal", opts) == "B"  # the option text
    assert A.extract_choice("liver or kidney", opts) is None
    assert A.extract_choice("lung cancer", {"A": "Lung", "B": "Lung cancer"}) == "B"  # an option inside another
    assert A.extract_choice("I cannot say", opts) is None
    prompt = A.mcq_prompt("Which organ?", opts, hint="CT scan")
    assert prompt.splitlines() == ["Hint: CT scan", "Question: Which organ?", "Options:", "A. Liver", "B. Kidney", "C. Spleen",
                                   "Please select the correct answer from the options above."]


# ---- loaders ----------------------------------------------------------------------------------------
def test_loaders_read_every_distributed_format(tmp_path):
    rad = load_benchmark("vqa-rad", make_vqa_rad_json(tmp_path / "rad"))
    assert [q.id for q in rad] == ["101", "102", "104"]  # only test questions
    assert [q.kind for q in rad] == ["closed", "open", "open"]
    assert rad[0].categories == {"image_organ": "CHEST", "question_type": "ABN"} and rad[0].image().size == (40, 32)

    hf = load_benchmark("vqa-rad", make_vqa_rad_parquet(tmp_path / "rad-hf"))
    assert [(q.id, q.kind) for q in hf] == [("0", "closed"), ("1", "open"), ("2", "closed")]  # row indices as ids
    assert hf[1].image().size == (40, 32)

    slake = load_benchmark("slake", make_slake(tmp_path / "slake"))
    assert [q.id for q in slake] == ["11", "13", "14"]  # English only
    assert [q.kind for q in slake] == ["closed", "closed", "open"]  # "Left" is a closed-set answer
    assert slake[2].categories["modality"] == "MRI"

    path = load_benchmark("pathvqa", make_pathvqa_tsv(tmp_path / "path"))
    assert [(q.id, q.kind, q.answer) for q in path] == [("0", "closed", "yes"), ("1", "open", "granuloma")]
    assert path[0].image().size == (40, 32)

    omni = load_benchmark("omnimedvqa", make_omnimedvqa(tmp_path / "omni"))
    assert [(q.id, q.answer) for q in omni] == [("omni_0", "B"), ("omni_1", "B"), ("omni_2", "B")]
    assert omni[2].options == {"A": "Macula", "B": "Optic disc", "C": "Vessel", "D": "Fovea"}
    assert omni[0].categories["modality"] == "X-Ray"

    gmai = load_benchmark("gmai-mmbench", make_gmai(tmp_path / "gmai"))
    assert [(q.id, q.answer, sorted(q.options)) for q in gmai] == [("7", "B", ["A", "B", "C"]), ("8", "A", ["A", "B"]),
                                                                   ("9", "C", ["A", "B", "C", "D"])]
    assert gmai[0].categories == {"modality": "CT", "clinical_task": "Disease Diagnosis", "department": "Urology",
                                  "granularity": "Organ"}


def test_malformed_files_name_the_file_and_line(tmp_path):
    root = make_slake(tmp_path / "slake")
    lines = (root / "test.json").read_text().splitlines()
    lines[3] = lines[3].replace('"answer": "Left", ', "")  # item 3 (line 4) loses its answer
    (root / "test.json").write_text("\n".join(lines))
    with pytest.raises(BenchmarkFileError, match=r"test\.json, line 4: missing field\(s\) \['answer'\]"):
        load_benchmark("slake", root)
    (root / "test.json").write_text("[\n" + '{"qid": 1,\n "img_name": }' + "\n]")
    with pytest.raises(BenchmarkFileError, match=r"test\.json, line 3: not valid JSON"):
        load_benchmark("slake", root)

    gmai = make_gmai(tmp_path / "gmai")
    tsv = gmai / "GMAI-MMBench_VAL.tsv"
    rows = tsv.read_text().splitlines()
    rows[2] = rows[2].rsplit("\t", 1)[0]  # line 3 loses a column
    tsv.write_text("\n".join(rows) + "\n")
    with pytest.raises(BenchmarkFileError, match=r"GMAI-MMBench_VAL\.tsv, line 3: 12 columns where the header has 13"):
        load_benchmark("gmai-mmbench", gmai)
    tsv.write_text("\t".join(GMAI_HEADER) + "\n" + "\t".join(["1", b64(0), "q?", "x", "y", "", "", "", "D", "CT", "t", "d", "g"]) + "\n")
    with pytest.raises(BenchmarkFileError, match=r"line 2: answer 'D' is not one of the options \['A', 'B'\]"):
        load_benchmark("gmai-mmbench", gmai)

    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 1, "prediction": "yes"}\n{"id": 2, "prediction": 5}\n')
    with pytest.raises(PredictionFileError, match=r"p\.jsonl, line 2: 'prediction' must be a string"):
        read_predictions(preds)
    preds.write_text('{"id": 1, "prediction": "yes"}\n{"id": "1", "prediction": "no"}\n')
    with pytest.raises(PredictionFileError, match="line 2: id '1' already given on line 1"):
        read_predictions(preds)
    preds.write_text('{"id": 1, "prediction": "yes"}\n{"id": 2, "predic')
    with pytest.raises(PredictionFileError, match="line 2: not valid JSON"):
        read_predictions(preds)
    assert read_predictions(preds, partial_tail=True) == {"1": "yes"}  # a run's unfinished last write


# ---- scores -----------------------------------------------------------------------------------------
def test_scores_match_hand_computed_values(tmp_path):
    questions = load_benchmark("vqa-rad", make_vqa_rad_json(tmp_path / "rad"))  # 101 closed "No", 102 open "Lung", 104 open "left upper lobe"
    results, rows = score("vqa-rad", questions, {"101": "It looks normal.", "102": "Lung."})
    # 101: whole-word rule wrong (substring rule would say right); 102: right; 104: missing -> wrong
    assert results["n"] == 3 and results["missing"] == 1 and results["missing_ids"] == ["104"]
    assert results["accuracy"] == pytest.approx(100 / 3, abs=1e-3)
    assert results["closed_accuracy"] == 0.0 and results["open_accuracy"] == 50.0
    assert results["open_recall"] == 50.0  # 102 recall 1, 104 recall 0
    assert results["yes_no_rule_disagreements"] == 1
    assert results["llava_closed_accuracy"] == 100.0  # LLaVA-Med's plain substrings: "normal" holds the answer "no"
    assert results["aligned"] == 75.0
    assert results["breakdowns"]["kind"] == {"closed": {"n": 1, "accuracy": 0.0}, "open": {"n": 2, "accuracy": 50.0}}
    assert results["breakdowns"]["image_organ"]["HEAD"] == {"n": 1, "accuracy": 0.0}
    assert [r["missing"] for r in rows] == [False, False, True]

    legacy, _ = score("vqa-rad", questions, {"101": "yes", "102": "lung"}, legacy_closed=True)
    assert legacy["llava_closed_accuracy"] is None and legacy["legacy_closed_quirk"]  # the wrong "yes" left the denominator
    intended, _ = score("vqa-rad", questions, {"101": "yes", "102": "lung"})
    assert intended["llava_closed_accuracy"] == 0.0

    with pytest.raises(ValueError, match="not questions of vqa-rad"):
        score("vqa-rad", questions, {"999": "yes"})


def test_multiple_choice_scores_with_macro_average_and_unparsed_count(tmp_path):
    questions = load_benchmark("omnimedvqa", make_omnimedvqa(tmp_path / "omni"))
    results, rows = score("omnimedvqa", questions, {"omni_0": "B. X-Ray", "omni_1": "A or B", "omni_2": "optic disc"})
    assert [r["choice"] for r in rows] == ["B", None, "B"]
    assert results["accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    assert results["unparsed"] == 1
    assert results["breakdowns"]["modality"] == {"Fundus Photography": {"n": 1, "accuracy": 100.0}, "X-Ray": {"n": 2, "accuracy": 50.0}}
    assert results["macro_accuracy"] == 75.0  # mean over modalities, beside the micro accuracy
    assert results["closed_accuracy"] is None and results["open_recall"] is None


def test_cli_scores_a_predictions_file_and_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from unimedvl.cli import app

    data = make_slake(tmp_path / "slake")
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": 11, "prediction": "Yes."}\n{"id": "13", "prediction": "left"}\n')
    result = CliRunner().invoke(app, ["eval", "vqa", "--benchmark", "slake", "--data", str(data), "--predictions", str(preds),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("benchmark", "n", "accuracy", "closed_accuracy", "open_accuracy", "open_recall"):
        assert key in saved
    assert saved["n"] == 3 and saved["missing"] == 1 and saved["closed_accuracy"] == 100.0
    assert saved["accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| **this run** | 66.67 |" in md and "| UniMedVL (paper Table 1) | 75.40 |" in md
    assert len((tmp_path / "out" / "scored.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "out" / "accuracy_by_modality.png").is_file()
    assert "1 question(s) had no prediction" in result.output

    bad = CliRunner().invoke(app, ["eval", "vqa", "--benchmark", "slake", "--data", str(tmp_path / "nowhere"), "--predictions", str(preds),
                                   "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "benchmark directory not found" in bad.output


def test_evaluate_vqa_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_vqa("slake", make_slake(tmp_path / "s"), tmp_path / "o")


# ---- running a model --------------------------------------------------------------------------------
def test_model_run_is_interrupted_and_resumed_without_repeating_answered_ids(fixture_a, tmp_path):
    from unimedvl.evaluation.runner import pipeline_answerer, run_benchmark
    from unimedvl.inference import UniMedVLPipeline

    pipe = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", visual_gen=False)
    questions = load_benchmark("gmai-mmbench", make_gmai(tmp_path / "gmai"))
    inner = pipeline_answerer(pipe, max_new_tokens=6, batch_size=2)
    asked: list[list[str]] = []

    def answer(items, fail_after=None):
        asked.append([prompt for _, prompt in items])
        if fail_after is not None and len(asked) > fail_after:
            raise KeyboardInterrupt  # the user stops the run during the second batch
        return inner(items)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark("gmai-mmbench", questions, lambda items: answer(items, fail_after=1), out, batch_size=2, progress=False)
    first = read_predictions(out / "predictions.jsonl")
    assert list(first) == ["7", "8"]  # the finished batch was kept
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "9", "predic')  # and a write cut off mid-line
    asked.clear()
    results = run_benchmark("gmai-mmbench", questions, answer, out, batch_size=2, progress=False)
    assert len(asked) == 1 and len(asked[0]) == 1 and asked[0][0].startswith("Question: Grade the lesion.")  # only id 9
    final = read_predictions(out / "predictions.jsonl")
    assert list(final) == ["7", "8", "9"] and {k: final[k] for k in first} == first
    assert results["n"] == 3 and results["missing"] == 0 and (out / "results.md").is_file()

    # the same answers as one uninterrupted run (greedy decoding is deterministic)
    fresh = tmp_path / "fresh"
    run_benchmark("gmai-mmbench", questions, inner, fresh, batch_size=3, progress=False)
    assert read_predictions(fresh / "predictions.jsonl") == final


def test_cli_runs_a_model_on_a_benchmark(fixture_a, tmp_path):
    from typer.testing import CliRunner

    from unimedvl.cli import app

    data = make_vqa_rad_json(tmp_path / "rad")
    args = ["eval", "vqa", "-b", "vqa-rad", "--data", str(data), "--model", str(fixture_a), "--out", str(tmp_path / "out"),
            "--dtype", "fp32", "--max-new-tokens", "4", "--limit", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(read_predictions(tmp_path / "out" / "predictions.jsonl")) == ["101", "102"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n"] == 2 and saved["missing"] == 0
    again = CliRunner().invoke(app, args)  # everything answered: nothing is run again, same results
    assert again.exit_code == 0 and json.loads((tmp_path / "out" / "results.json").read_text()) == saved


# ---- judge-assisted open accuracy ---------------------------------------------------------------


class _JudgeServer:
    """A loopback OpenAI-compatible judge: answers "yes" when the candidate contains a word of the
    reference; fails the first request of each question with HTTP 500 so retries are exercised."""

    def __init__(self):
        import http.server
        import threading

        self.requests: list[dict] = []
        seen: set[str] = set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                prompt = body["messages"][0]["content"]
                if prompt not in seen:
                    seen.add(prompt)
                    self.send_response(500)
                    self.end_headers()
                    return
                ref = prompt.split("Reference answer: ")[1].split("\n")[0].lower().split()
                cand = prompt.split("Candidate answer: ")[1].split("\n")[0].lower()
                reply = "Yes." if any(w in cand for w in ref) else "No"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_judge_assisted_open_accuracy_with_a_local_judge_retries_and_caches(tmp_path):
    from unimedvl.evaluation.judge import ChatJudge, parse_verdict

    assert parse_verdict("Yes.") is True and parse_verdict("no") is False
    assert parse_verdict("yes and no") is None and parse_verdict("maybe") is None and parse_verdict("noted") is None
    server = _JudgeServer()
    try:
        data = make_vqa_rad_json(tmp_path / "rad")  # 101 closed "No", 102 open "Lung", 104 open "left upper lobe"
        preds = tmp_path / "preds.jsonl"
        preds.write_text('{"id": 101, "prediction": "no"}\n{"id": 102, "prediction": "the lungs"}\n'
                         '{"id": 104, "prediction": "right kidney"}\n')
        judge = ChatJudge(server.url, "local-judge", api_key="k1")
        results = evaluate_vqa("vqa-rad", data, tmp_path / "out", predictions=preds, judge=judge)
        # strict: 102 and 104 wrong; judge: 102 ("lung" in "the lungs") right, 104 wrong
        assert results["open_accuracy"] == 0.0 and results["open_accuracy_judge"] == 50.0
        assert results["accuracy_judge"] == pytest.approx(200 / 3, abs=1e-3) and results["judge_failures"] == 0
        assert results["judge_model"] == "local-judge"
        temps = [r["temperature"] for r in server.requests]
        assert temps == [0.0, 0.5, 0.0, 0.5]  # each question: a failed try, then a second at a higher temperature
        assert {r["path"] for r in server.requests} == {"/v1/chat/completions"} and {r["auth"] for r in server.requests} == {"Bearer k1"}
        assert "judge local-judge" in (tmp_path / "out" / "results.md").read_text()
        n = len(server.requests)
        again = evaluate_vqa("vqa-rad", data, tmp_path / "out", predictions=preds, judge=judge)
        assert len(server.requests) == n and again["open_accuracy_judge"] == 50.0  # verdicts come from judgements.jsonl
    finally:
        server.close()
    # an unreachable judge: no verdict, counted wrong and reported
    dead = ChatJudge(server.url, "gone", timeout_s=2)
    results = evaluate_vqa("vqa-rad", data, tmp_path / "out2", predictions=preds, judge=dead)
    assert results["judge_failures"] == 2 and results["open_accuracy_judge"] == 0.0


def test_cli_judge_options_come_in_pairs(tmp_path):
    from typer.testing import CliRunner

    from unimedvl.cli import app

    data = make_slake(tmp_path / "slake")
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 11, "prediction": "Yes."}\n')
    result = CliRunner().invoke(app, ["eval", "vqa", "-b", "slake", "--data", str(data), "--predictions", str(preds),
                                      "--out", str(tmp_path / "o"), "--judge-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 2 and "--judge-model" in result.output
