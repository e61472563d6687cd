import json
import random

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

import ragkit
from ragkit.answers import has_answer
from ragkit.cli import app
from ragkit.errors import RagkitError
from ragkit.mining import draw_random_negatives, select_examples

# --- selection rules, without BM25 -------------------------------------------------------------------


def flags_from(texts, answers):
    return lambda rows: [has_answer(answers, texts[r]) for r in rows]


def test_gold_positives_are_kept_and_never_negatives():
    texts = {1: "x", 2: "y", 3: "z", 4: "w"}
    sel = select_examples([3, 1, 4, 2], gold=[1], negatives=5, answer_flags=flags_from(texts, ["nope"]))
    assert sel.positives == [1] and sel.hard_negatives == [3, 4, 2] and sel.answer_rank is None


def test_without_gold_the_best_ranked_answer_passage_is_the_positive():
    texts = {0: "a party", 1: "the art museum", 2: "fine art", 3: "nothing"}
    sel = select_examples([0, 3, 1, 2], gold=[], negatives=10, answer_flags=flags_from(texts, ["art"]))
    # "party" is not the token "art": passage 0 is a hard negative; passage 1 (rank 3) is the positive.
    assert sel.positives == [1] and sel.answer_rank == 3
    assert sel.hard_negatives == [0, 3]  # passage 2 contains the answer too: never a negative
    assert sel.answer_passages == [1, 2]


def test_question_without_answers_or_gold_gets_no_positive():
    sel = select_examples([5, 6], gold=[], negatives=1, answer_flags=None)
    assert sel.positives == [] and sel.hard_negatives == [5]


def test_judged_relevant_passages_are_not_negatives():
    sel = select_examples([5, 6, 7, 8], gold=[9], negatives=3, judged_relevant=[False, True, False, True])
    assert sel.hard_negatives == [5, 7]


def test_negatives_are_capped_in_rank_order_and_every_answer_passage_is_found():
    seen = []

    def flags(rows):
        seen.extend(rows)
        return [r in (2, 97) for r in rows]

    ranked = list(range(100))
    sel = select_examples(ranked, gold=[], negatives=3, answer_flags=flags, block=4)
    assert sel.hard_negatives == [0, 1, 3] and sel.positives == [2]
    assert sel.answer_passages == [2, 97]  # found far below the point where the negatives were complete
    assert seen == ranked


def test_without_answers_scanning_stops_once_the_negatives_are_found():
    read = []

    class Judged(list):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    sel = select_examples(list(range(100)), gold=[7], negatives=3, judged_relevant=Judged([False] * 100), block=4)
    assert sel.hard_negatives == [0, 1, 2] and sel.answer_passages == []
    assert read == [0, 1, 2]  # the first block was enough


def test_random_negatives_respect_the_filters():
    texts = {i: ("gold answer here" if i % 3 == 0 else f"text {i}") for i in range(60)}
    judged = lambda rows: [r % 5 == 0 for r in rows]  # noqa: E731
    picked = draw_random_negatives(np.random.default_rng(0), 60, 10, {1, 2}, flags_from(texts, ["answer"]), judged)
    assert len(picked) == len(set(picked)) == 10
    assert not any(r % 3 == 0 or r % 5 == 0 or r in {1, 2} for r in picked)
    again = draw_random_negatives(np.random.default_rng(0), 60, 10, {1, 2}, flags_from(texts, ["answer"]), judged)
    assert picked == again


# --- the stage, on generated data through `ragkit ingest` ---------------------------------------------

FILLER = [f"word{i}" for i in range(60)]


def generate_corpus(root, n_passages=240, n_questions=50, seed=0):
    """A DPR passage tsv and a jsonl of questions whose answers are planted in a few passages.

    Answers are tokens like ``ans7``; decoys ``ans7x`` and ``preans7`` contain the answer as a substring
    only, which token-level matching must not count. Every question shares words with its passages so
    BM25 ranks them; some questions name gold passages, some only answers, some neither.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(rng.choices(FILLER, k=rng.randint(8, 30))) for _ in range(n_passages)]
    questions = []
    for q in range(n_questions):
        topic = [f"topic{q}a", f"topic{q}b"]
        hosts = rng.sample(range(n_passages), 6)
        answer = f"ans{q}"
        for j, row in enumerate(hosts):
            extra = topic + ([answer] if j < 2 else [f"{answer}x" if j % 2 else f"pre{answer}"])
            texts[row] += " " + " ".join(extra)
        if q % 8 == 0:
            # A long gold passage: ingest cuts it into windows and keeps as positive only the one with the
            # answer; the other window still matches the topic but is judged relevant, so never a negative.
            texts[hosts[0]] = " ".join(topic + [answer] + rng.choices(FILLER, k=110) + topic)
        kind = q % 4
        questions.append({
            "id": f"q{q}",
            "question": " ".join(topic + rng.choices(FILLER, k=3)),
            "answers": [answer] if kind != 3 else [],
            "positive_ids": [f"p{hosts[0]}"] if kind in (0, 3) and q % 8 != 7 else [],
        })
    # A question nothing retrieves: no gold, its answer nowhere in the corpus.
    questions.append({"id": "lost", "question": "unrelatedterm", "answers": ["nowhere"], "positive_ids": []})
    with open(root / "passages.tsv", "w") as handle:
        handle.write("id\ttext\ttitle\n")
        for i, text in enumerate(texts):
            handle.write(f"p{i}\t{text}\tTitle {i % 17}\n")
    split_at = int(len(questions) * 0.8)
    for split, rows in (("train", questions[:split_at]), ("dev", questions[split_at:])):
        with open(root / f"{split}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    raw = generate_corpus(root / "raw")
    manifest = ragkit.ingest(
        [str(raw / "passages.tsv"), f"train={raw / 'train.jsonl'}", f"dev={raw / 'dev.jsonl'}"], str(root / "ingest")
    )
    return manifest.path


def load_split(artifact, split):
    return datasets.load_from_disk(str(artifact / "examples" / split)).to_list()


def read_run(path):
    ranked = {}
    for line in path.read_text().splitlines():
        qid, _, pid, _, _, _ = line.split()
        ranked.setdefault(qid, []).append(pid)
    return ranked


def test_mined_examples_follow_the_rules(ingested, tmp_path):
    manifest = ragkit.mine(str(ingested), str(tmp_path / "mine"), negatives=8, random_negatives=3, depth=40, workers=1)
    passages = {p["id"]: p for p in datasets.load_from_disk(str(ingested / "passages")).to_list()}
    checked_negatives = checked_answers = 0
    for split in ("train", "dev"):
        questions = {q["id"]: q for q in datasets.load_from_disk(str(ingested / "questions" / split)).to_list()}
        examples = load_split(tmp_path / "mine", split)
        run = read_run(tmp_path / "mine" / "runs" / f"{split}.trec")
        kept = {e["id"] for e in examples}
        for example in examples:
            q = questions[example["id"]]
            relevant_docs = {d for d, s in zip(q["doc_ids"], q["doc_scores"]) if s > 0}
            if q["positive_ids"]:
                assert example["positive_ids"] == q["positive_ids"]
            else:
                first = next(p for p in run[q["id"]] if has_answer(q["answers"], passages[p]["text"]))
                assert example["positive_ids"] == [first]
            negatives = example["hard_negative_ids"] + example["random_negative_ids"]
            assert len(set(negatives)) == len(negatives) and len(example["random_negative_ids"]) == 3
            for pid in negatives:
                assert not has_answer(q["answers"], passages[pid]["text"])
                assert pid not in q["positive_ids"] and passages[pid]["doc_id"] not in relevant_docs
                checked_negatives += 1
            # Hard negatives are the best-ranked passages that pass the filters, in rank order.
            eligible = [p for p in run[q["id"]] if not has_answer(q["answers"], passages[p]["text"])
                        and p not in q["positive_ids"] and passages[p]["doc_id"] not in relevant_docs]
            assert example["hard_negative_ids"] == eligible[:8]
            # Answer passages: the positives, then every retrieved passage with an answer, in rank order.
            holding = [p for p in run[q["id"]] if has_answer(q["answers"], passages[p]["text"])]
            expected = list(dict.fromkeys(example["positive_ids"] + holding))
            assert example["answer_passage_ids"] == expected
            checked_answers += len(holding) > 1
        dropped = [qid for qid in questions if qid not in kept]
        for qid in dropped:
            q = questions[qid]
            assert not q["positive_ids"]
            assert not any(has_answer(q["answers"], passages[p]["text"]) for p in run.get(qid, []))
        assert manifest.counts["dropped_without_positive"][split] == len(dropped)
        assert manifest.counts["examples"][split] == len(examples) == len(questions) - len(dropped)
    assert "lost" not in kept and checked_negatives > 300 and checked_answers > 5
    # The filters had work to do: windows of judged documents and decoys that hold an answer only as a
    # substring (ans7x, preans7, which are fair negatives) were among the candidates.
    windowed = [p for p in passages if "#" in p]
    assert windowed and any(p in run_ids for p in windowed for run_ids in run.values())
    decoys = [p for e in load_split(tmp_path / "mine", "train") if e["answers"] for p in e["hard_negative_ids"]
              if {e["answers"][0] + "x", "pre" + e["answers"][0]} & set(passages[p]["text"].split())]
    assert decoys


def test_workers_and_chunking_do_not_change_the_output(ingested, tmp_path):
    options = dict(negatives=5, random_negatives=2, depth=30, export_dpr=True, seed=3)
    one = ragkit.mine(str(ingested), str(tmp_path / "one"), workers=1, chunk_size=1000, **options)
    two = ragkit.mine(str(ingested), str(tmp_path / "two"), workers=2, chunk_size=7, **options)
    for split in ("train", "dev"):
        assert load_split(tmp_path / "one", split) == load_split(tmp_path / "two", split)
        for name in (f"runs/{split}.trec", f"dpr/{split}.json"):
            assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert one.counts == two.counts
    for split in one.metrics:  # sums merged from workers may differ in the last bit
        assert one.metrics[split] == pytest.approx(two.metrics[split], rel=1e-12)


def test_dpr_export_and_manifest(ingested, tmp_path):
    manifest = ragkit.mine(str(ingested), str(tmp_path / "mine"), negatives=4, random_negatives=1, export_dpr=True, workers=1)
    passages = {p["id"]: p for p in datasets.load_from_disk(str(ingested / "passages")).to_list()}
    items = json.loads((tmp_path / "mine" / "dpr" / "train.json").read_text())
    examples = load_split(tmp_path / "mine", "train")
    assert len(items) == len(examples)
    for item, example in zip(items, examples):
        assert item["question"] == example["question"] and item["answers"] == example["answers"]
        for key, ids in (("positive_ctxs", "positive_ids"), ("hard_negative_ctxs", "hard_negative_ids"), ("negative_ctxs", "random_negative_ids")):
            assert [c["passage_id"] for c in item[key]] == example[ids]
            for ctx in item[key]:
                assert (ctx["title"], ctx["text"]) == (passages[ctx["passage_id"]]["title"], passages[ctx["passage_id"]]["text"])
    config = manifest.config
    assert config["depth"] == 100 and config["negatives"] == 4
    assert config["bm25"]["backend"] == "bm25s" and config["bm25"]["tokenizer"]["pattern"] == r"\w+"
    assert manifest.inputs[0]["stage"] == "ingest"
    for split in ("train", "dev"):
        m = manifest.metrics[split]
        assert 0 < m["accuracy@20"] <= m["accuracy@100"] <= 1 and "ndcg@10" in m
        assert manifest.counts["mean_hard_negatives"][split] > 0
    saved = json.loads((tmp_path / "mine" / "bm25" / "config.json").read_text())
    assert saved["passages"] == manifest.counts["passages"] and saved["fields"] == "title + ' ' + text"


def test_index_is_reused_only_when_it_matches(ingested, tmp_path):
    first = ragkit.mine(str(ingested), str(tmp_path / "a"), workers=1)
    assert first.counts["bm25_reused"] is False
    again = ragkit.mine(str(ingested), str(tmp_path / "a"), workers=1, negatives=3, overwrite=True)
    assert again.counts["bm25_reused"] is True
    other = ragkit.mine(str(ingested), str(tmp_path / "b"), workers=1, index_from=str(tmp_path / "a"))
    assert other.counts["bm25_reused"] is True and other.inputs[1]["path"] == str((tmp_path / "a").resolve())
    assert (tmp_path / "a" / "runs" / "train.trec").read_text() == (tmp_path / "b" / "runs" / "train.trec").read_text()
    changed = ragkit.mine(str(ingested), str(tmp_path / "a"), workers=1, k1=0.9, overwrite=True)
    assert changed.counts["bm25_reused"] is False
    with pytest.raises(RagkitError, match=r"was built with other k1 than this run asks for"):
        ragkit.mine(str(ingested), str(tmp_path / "c"), workers=1, index_from=str(tmp_path / "a"))  # a now has k1=0.9
    assert not (tmp_path / "c").exists()


def test_rank_bm25_backend_mines_the_same_examples(ingested, tmp_path):
    ragkit.mine(str(ingested), str(tmp_path / "fast"), workers=1, negatives=5)
    ragkit.mine(str(ingested), str(tmp_path / "ref"), workers=1, negatives=5, backend="rank-bm25")
    for split in ("train", "dev"):
        fast, ref = load_split(tmp_path / "fast", split), load_split(tmp_path / "ref", split)
        assert [e["positive_ids"] for e in fast] == [e["positive_ids"] for e in ref]
        assert read_run(tmp_path / "fast" / "runs" / f"{split}.trec").keys() == read_run(tmp_path / "ref" / "runs" / f"{split}.trec").keys()


def test_cli_ingest_mine_evaluate(tmp_path):
    raw = generate_corpus(tmp_path / "raw", n_passages=80, n_questions=16, seed=5)
    cli = CliRunner()
    result = cli.invoke(app, ["ingest", str(raw / "passages.tsv"), f"train={raw / 'train.jsonl'}", "--out", str(tmp_path / "ingest")])
    assert result.exit_code == 0, result.output
    result = cli.invoke(app, ["mine", str(tmp_path / "ingest"), "--out", str(tmp_path / "mine"), "--negatives", "4", "--workers", "1", "--export-dpr"])
    assert result.exit_code == 0, result.output
    assert "top20" in result.output and (tmp_path / "mine" / "dpr" / "train.json").is_file()
    result = cli.invoke(app, ["evaluate", str(tmp_path / "mine"), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "nDCG@10" in result.output
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["train"]
    mined = json.loads((tmp_path / "mine" / "manifest.json").read_text())["metrics"]["train"]
    # The evaluate stage re-reads the TREC run and must agree with what mining measured.
    assert evaluated.pop("questions_without_results") == 0
    assert evaluated == pytest.approx(mined)
    # An artifact of the wrong stage is refused in one line, exit status 2.
    result = cli.invoke(app, ["mine", str(tmp_path / "mine"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "was written by stage 'mine', this stage reads the output of stage 'ingest'" in result.output
    result = cli.invoke(app, ["evaluate", str(tmp_path / "ingest"), "--out", str(tmp_path / "eval2")])
    assert result.exit_code == 2 and "no runs/ folder" in result.output
    assert not (tmp_path / "again").exists() and not (tmp_path / "eval2").exists()


def test_mine_config_refuses_bad_settings(ingested, tmp_path):
    with pytest.raises(RagkitError, match="rank-bm25 backend implements only 'robertson'"):
        ragkit.mine(str(ingested), str(tmp_path / "m"), backend="rank-bm25", method="lucene")
    with pytest.raises(RagkitError, match="depth=0 must be > 0"):
        ragkit.mine(str(ingested), str(tmp_path / "m"), depth=0)
    with pytest.raises(RagkitError, match="has no 'test' split"):
        ragkit.mine(str(ingested), str(tmp_path / "m"), splits=["test"])
    assert not (tmp_path / "m").exists()


def test_given_negatives_from_dpr_json(tmp_path):
    """DPR JSON ships hard negatives: ignored by default, put first or used alone on request, always filtered."""
    raw = tmp_path / "raw"
    raw.mkdir()
    filler = ["river", "stone", "market", "winter", "glass", "paper", "lamp", "harbor"]
    rows = [(f"p{i}", " ".join(filler[(i + j) % 8] for j in range(6)) + f" extra{i}", f"T{i}") for i in range(40)]
    rows[1] = ("p1", "the founder of acme is alice jones and more words", "Acme")  # gold
    rows[2] = ("p2", "acme founder alice jones again", "Acme")  # given, but holds the answer
    rows[3] = ("p3", "acme founder alice again story", "Acme")  # given, fair: shares words, no answer
    rows[4] = ("p4", "acme founder bob smith", "Acme")  # given, fair
    rows[5] = ("p5", "acme founder story of acme founder", "Acme")  # mined by BM25 only
    with open(raw / "psgs.tsv", "w") as handle:
        handle.write("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t{ti}\n" for i, t, ti in rows))

    def ctx(i):
        return {"passage_id": rows[i][0], "title": rows[i][2], "text": rows[i][1]}

    items = [{"question": "who is the founder of acme", "answers": ["alice jones"],
              "positive_ctxs": [ctx(1)], "hard_negative_ctxs": [ctx(4), ctx(2), ctx(1), ctx(3), ctx(4)]},
             {"question": "extra7 extra8 extra9", "answers": ["extra7"], "positive_ctxs": [ctx(7)],
              "hard_negative_ctxs": []}]
    (raw / "train.json").write_text(json.dumps(items))
    ingested = ragkit.ingest([str(raw / "psgs.tsv"), str(raw / "train.json")], str(tmp_path / "ingest")).path
    assert load_split_questions(ingested)[0]["hard_negative_ids"] == ["p4", "p2", "p3"]  # gold dropped by ingest

    def mined(mode, negatives=4):
        out = tmp_path / f"mine-{mode}-{negatives}"
        manifest = ragkit.mine(str(ingested), str(out), negatives=negatives, given_negatives=mode, workers=1)
        assert manifest.config["filters"]["given_negatives"] == mode
        return [e["hard_negative_ids"] for e in load_split(out, "train")]

    ignored, first, only = mined("ignore"), mined("first"), mined("only")
    run = read_run(tmp_path / "mine-ignore-4" / "runs" / "train.trec")
    eligible = [p for p in run["train-0"] if p not in ("p1", "p2")]  # not gold, no answer
    assert ignored[0] == eligible[:4]
    # p2 holds the answer and is filtered out even though it was given; the order given is kept.
    assert only[0] == ["p4", "p3"]
    assert first[0] == list(dict.fromkeys(["p4", "p3"] + eligible))[:4]
    assert mined("first", negatives=1)[0] == ["p4"]
    assert only[1] == [] and first[1] == ignored[1] != []
    with pytest.raises(RagkitError, match="given_negatives='all' is not one of"):
        ragkit.mine(str(ingested), str(tmp_path / "bad"), given_negatives="all")


def load_split_questions(artifact, split="train"):
    return datasets.load_from_disk(str(artifact / "questions" / split)).to_list()
