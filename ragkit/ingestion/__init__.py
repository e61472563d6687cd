"""``ragkit ingest``: raw corpora and QA sets -> passages + questions (the ingest artifact).

One module per job: a reader per format (:mod:`.dpr`, :mod:`.beir`, :mod:`.squad`, :mod:`.jsonl`,
:mod:`.msmarco`, :mod:`.qrels`, and :mod:`.frames` for in-memory records), what readers produce
(:mod:`.sources`), reading files (:mod:`.files`), telling formats apart (:mod:`.formats`), windows
(:mod:`.windows`), splits (:mod:`.splits`), writing the artifact (:mod:`.writers`) and the stage itself
(:mod:`.stage`, ``run(cfg) -> Manifest``).

Any input file may be gzip-compressed (``psgs_w100.tsv.gz``, ``nq-train.json.gz``): a ``.gz`` suffix is
read through ``gzip`` and the format comes from the suffix before it.

Documents are cut DPR-style into windows of ``window`` words starting every ``stride`` words. A window is
the verbatim slice of its document from its first word to its last, and keeps the document's title in the
``title`` column. A document that fits one window keeps its id; a longer one gives ``{doc_id}#{k}``.
A question's positives follow its evidence: the windows holding a whole answer span (SQuAD), every window
of a document judged relevant (BEIR, TREC / MS MARCO qrels), or a named gold passage (DPR JSON, jsonl,
records), narrowed to the windows that contain an answer when that passage was cut.

The corpus streams through in bounded memory. Questions are read first (they are small) and name the
few documents whose windows must be remembered; passages go shard by shard straight into the layout
``Dataset.save_to_disk`` writes; repeated ids are caught with sorted arrays of 16-byte digests instead of
a set of strings.
"""

from .formats import FORMATS, detect_format
from .splits import carve_dev, infer_split
from .stage import run
from .windows import passage_ids, window_ranges
from .writers import PASSAGE_COLUMNS, QUESTION_COLUMNS, passage_features, question_features

__all__ = [
    "FORMATS", "PASSAGE_COLUMNS", "QUESTION_COLUMNS", "carve_dev", "detect_format", "infer_split", "passage_features",
    "passage_ids", "question_features", "run", "window_ranges",
]
