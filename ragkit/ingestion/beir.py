"""BEIR: a directory with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; the questions of a
split are the queries its qrels judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import RagkitError, located
from .files import jsonl_records
from .qrels import read_qrels
from .sources import Document, Question, ReadOptions, Source, optional_text, required_id, required_text


class Beir(Source):
    role = "passages"
    holds_passages = True

    def __init__(self, path: Path, split: str | None, options: ReadOptions) -> None:
        super().__init__(path, split, options)
        self.corpus = path / "corpus.jsonl"
        self.queries = path / "queries.jsonl"
        self.qrels = sorted((path / "qrels").glob("*.tsv"))
        if split is not None:
            wanted = path / "qrels" / f"{split}.tsv"
            if not wanted.is_file():
                known = ", ".join(q.stem for q in self.qrels) or "none"
                raise located(path, None, f"no qrels/{split}.tsv (splits here: {known}); fix the split name")
            self.qrels = [wanted]
        if self.qrels and not self.queries.is_file():
            raise located(path, None, "has qrels but no queries.jsonl (add the queries file)")

    def files(self) -> list[tuple[Path, str]]:
        files = [(self.corpus, "passages")]
        if self.qrels:
            files.append((self.queries, "queries"))
        return files + [(q, "qrels") for q in self.qrels]

    def questions(self) -> list[Question]:
        if not self.qrels:
            return []
        texts: dict[str, str] = {}
        for line, record in jsonl_records(self.queries):
            where = f"{self.queries}:{line}"
            query_id = required_id(record, "_id", where, "BEIR queries are {_id, text}")
            texts.setdefault(query_id, required_text(record, "text", where, "BEIR queries are {_id, text}"))
        out = []
        for qrels in self.qrels:
            by_query: dict[str, Question] = {}
            for where, query_id, doc_id, grade in read_qrels(qrels):
                if query_id not in texts:
                    raise RagkitError(f"{where}: query '{query_id}' is not in {self.queries.name} (add it or remove the line)")
                question = by_query.get(query_id)
                if question is None:
                    question = by_query[query_id] = Question(query_id, texts[query_id], [], qrels.stem, where)
                question.judge(doc_id, grade, where)
            out.extend(by_query.values())
        return out

    def documents(self) -> Iterator[Document]:
        if not self.corpus.is_file():
            raise located(self.path, None, "no corpus.jsonl (a BEIR directory needs one)")
        fix = "BEIR corpus lines are {_id, title, text}"
        for line, record in jsonl_records(self.corpus):
            where = f"{self.corpus}:{line}"
            yield Document(required_id(record, "_id", where, fix), optional_text(record, "title", where),
                            required_text(record, "text", where, fix), self.corpus, line)

