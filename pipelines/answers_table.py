"""Print the EM / F1 / recall of several `ragkit answer` artifacts side by side.

    python pipelines/answers_table.py closed-book=work/answer-closed bm25=work/answer-bm25 ...

Each argument is ``name=path`` (or a path, named after its directory). Rows: the settings (retrieval,
decoding, passages per question) and the scores on the split each artifact answered, in percent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(arguments: list[str]) -> int:
    if not arguments:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    columns = []
    for argument in arguments:
        name, _, path = argument.rpartition("=") if "=" in argument else (Path(argument).name, "", argument)
        metrics_file = Path(path) / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            print(f"error: {metrics_file}: missing (run `ragkit answer ... --out {path}` first)", file=sys.stderr)
            return 2
        columns.append((name, metrics, metrics[metrics["source"]]))
    n_docs = {m["n_docs"] for _, m, _ in columns if m["n_docs"]}
    rows = [("retrieval", lambda m, s: m["retrieval"]), ("decoding", lambda m, s: m["decoding"] if m["n_docs"] else "greedy"),
            ("passages", lambda m, s: str(m["n_docs"])), ("questions", lambda m, s: str(s["judged"])),
            ("EM", lambda m, s: f"{100 * s['em']:.1f}"), ("F1", lambda m, s: f"{100 * s['f1']:.1f}")]
    rows += [(f"recall@{k}", lambda m, s, k=k: f"{100 * s[f'recall@{k}']:.1f}" if f"recall@{k}" in s else "-")
             for k in sorted(n_docs)]
    width = max(12, *(len(name) + 2 for name, _, _ in columns))
    source = columns[0][1]["source"]
    print(f"{source:<12}" + "".join(f"{name:>{width}}" for name, _, _ in columns))
    for label, cell in rows:
        print(f"{label:<12}" + "".join(f"{cell(m, s):>{width}}" for _, m, s in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
