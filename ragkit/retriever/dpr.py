"""DPR's checkpoint layout: a trained retriever exported as a ``DPRQuestionEncoder`` + ``DPRContextEncoder`` pair.

DPR (Karpukhin et al. 2020, arXiv:2004.04906) encodes questions and passages with two BERT towers and
scores with the dot product of their raw [CLS] vectors. transformers ships the towers as
``DPRQuestionEncoder`` and ``DPRContextEncoder``: a BERT model without pooler (state-dict prefixes
``question_encoder.bert_model.`` / ``ctx_encoder.bert_model.``), an optional linear ``encode_proj`` when
``projection_dim > 0``, and ``pooler_output`` (the [CLS] state, projected) as the embedding.

``ragkit export dpr RETRIEVER --out DIR`` writes::

    manifest.json
    question_encoder/   DPRQuestionEncoder.from_pretrained(DIR/question_encoder), with the tokenizer
    ctx_encoder/        DPRContextEncoder.from_pretrained(DIR/ctx_encoder), with the tokenizer

whose ``pooler_output`` equals the retriever's query / passage embeddings. Only a retriever whose embedding
is that raw vector can be exported: ``cls`` pooling of BERT towers (or ``dpr`` pooling of DPR towers), no
normalisation, dot-product similarity. A shared retriever's one tower is written as both encoders. The
pair starts a new training run with ``--model DIR/question_encoder --passage-model DIR/ctx_encoder``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..artifacts import Manifest, artifact_input, read_upstream, staged_output
from ..config import ExportDprConfig, as_dict
from ..errors import RagkitError
from .encoder import PASSAGE_DIR, QUERY_DIR, SPEC_FILE, BiEncoder, RetrieverSpec, load_tokenizer

STAGE = "export-dpr"
QUESTION_ENCODER_DIR = "question_encoder"
CTX_ENCODER_DIR = "ctx_encoder"
# Config keys that describe the saved file rather than the network; the projection is set from the model.
_NOT_ARCHITECTURE = ("architectures", "model_type", "transformers_version", "_name_or_path", "projection_dim")


def run(cfg: ExportDprConfig) -> Manifest:
    """Write the retriever ``cfg.retriever`` in DPR's layout to ``cfg.out`` (atomically, with a manifest)."""
    source = Path(cfg.retriever)
    upstream = read_upstream(source, "train-retriever", verify_inputs=False)
    spec = RetrieverSpec.load(source)
    check_exportable(spec, source / SPEC_FILE)
    encoder = BiEncoder.from_pretrained(str(source))
    passage_model = encoder.query_model if encoder.passage_model is None else encoder.passage_model
    towers = (
        (QUESTION_ENCODER_DIR, as_dpr(encoder.query_model, "query", source / QUERY_DIR), QUERY_DIR),
        (CTX_ENCODER_DIR, as_dpr(passage_model, "passage", source / PASSAGE_DIR), PASSAGE_DIR),
    )
    with staged_output(cfg.out, cfg.overwrite) as tmp:
        for name, model, tower_dir in towers:
            model.save_pretrained(tmp / name)
            load_tokenizer(str(source / tower_dir)).save_pretrained(tmp / name)
        manifest = Manifest(
            stage=STAGE,
            config=as_dict(cfg),
            inputs=[artifact_input(source, upstream)],
            counts={"embedding_dim": encoder.embedding_dim, "towers": 1 if spec.shared else 2},
            files={"question_encoder": QUESTION_ENCODER_DIR, "ctx_encoder": CTX_ENCODER_DIR},
        )
        manifest.save(tmp)
    manifest.path = Path(cfg.out)
    return manifest


def check_exportable(spec: RetrieverSpec, spec_file: Path) -> None:
    """Refuse a retriever whose embeddings or scores a DPR encoder pair would not reproduce."""
    problems = [f"pooling={spec.pooling!r}"] if spec.pooling == "mean" else []
    problems += ["normalize=True"] if spec.normalize else []
    problems += [f"similarity={spec.similarity!r}"] if spec.similarity != "dot" else []
    if problems:
        raise RagkitError(
            f"{spec_file}: {', '.join(problems)}, but a DPR encoder's embedding is its raw [CLS] vector scored by "
            f"dot product (export a retriever trained with --pooling cls --no-normalize --similarity dot)"
        )


def as_dpr(model: nn.Module, tower: str, source: Path) -> nn.Module:
    """A BERT or DPR tower as DPR's encoder class for ``tower`` (``"query"`` or ``"passage"``), same weights.

    Its ``pooler_output`` is the tower's [CLS] state (through the tower's projection if it has one), so it
    equals the tower's embedding under ``cls`` / ``dpr`` pooling without normalisation.
    """
    from transformers import BertModel, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    if model.config.model_type == "dpr":
        inner = model.question_encoder if isinstance(model, DPRQuestionEncoder) else model.ctx_encoder
        bert, projection = inner.bert_model, getattr(inner, "encode_proj", None)
    elif isinstance(model, BertModel):
        bert, projection = model, None
    else:
        raise RagkitError(
            f"{source}: a {model.config.model_type} model, but DPR's encoders hold a BERT model "
            f"(only retrievers trained from BERT or DPR models export to DPR)"
        )
    shared_settings = DPRConfig().to_dict().keys() - set(_NOT_ARCHITECTURE)
    settings = {key: value for key, value in bert.config.to_dict().items() if key in shared_settings}
    config = DPRConfig(**settings, projection_dim=0 if projection is None else projection.out_features)
    target = (DPRQuestionEncoder if tower == "query" else DPRContextEncoder)(config)
    encoder = target.question_encoder if tower == "query" else target.ctx_encoder
    # A pooler head (present only when a tower was built outside ragkit) is not part of DPR's encoder.
    encoder.bert_model.load_state_dict({k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")})
    if projection is not None:
        encoder.encode_proj.load_state_dict(projection.state_dict())
    return target.eval()
