"""Print BM25 and the trained dense retriever side by side on the demo's dev questions.

    python pipelines/demo/compare.py artifacts/demo/retriever

Both columns come from the retriever's manifest: ``metrics.bm25_dev`` is the BM25 run of the mine artifact
it was trained from, ``metrics.dev_start`` the starting model before any step, ``metrics.dev`` the kept
(trained) model, each an exact search over the whole corpus on the same questions with the same metric
code (``ragkit.evaluation``).
"""

from __future__ import annotations

import sys

from ragkit.artifacts import read_upstream

ROWS = ("accuracy@1", "accuracy@5", "accuracy@20", "accuracy@100", "recall@20", "mrr@10", "ndcg@10")


def main(retriever_dir: str) -> int:
    metrics = read_upstream(retriever_dir, "train-retriever").metrics
    columns = {"BM25": metrics["bm25_dev"], "untrained": metrics.get("dev_start"), "trained": metrics["dev"]}
    columns = {name: values for name, values in columns.items() if values}
    print(f"\ndev questions: {metrics['dev']['questions']}   (accuracy@k: DPR has_answer in the top k passages)")
    print(f"{'metric':<14}" + "".join(f"{name:>11}" for name in columns))
    for row in ROWS:
        if all(row in values for values in columns.values()):
            print(f"{row:<14}" + "".join(f"{values[row]:>11.3f}" for values in columns.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
