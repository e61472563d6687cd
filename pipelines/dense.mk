# Rules every retrieval recipe shares after its own ingest, mine and training: the trained retriever's index,
# its hybrid with BM25 (alpha tuned on validation, applied to dev), the five-run comparison on dev, the
# check and clean. Included by pipelines/<name>/Makefile, which defines RAGKIT, PYTHON, WORK and STAGES.

$(WORK)/index/manifest.json: $(WORK)/retriever/manifest.json
	$(RAGKIT) index $(WORK)/mine --model $(WORK)/retriever --split validation --split dev --out $(WORK)/index --overwrite

$(WORK)/hybrid/manifest.json: $(WORK)/index/manifest.json
	$(RAGKIT) hybrid $(WORK)/index $(WORK)/mine --out $(WORK)/hybrid --overwrite

$(WORK)/compare/manifest.json: $(WORK)/hybrid/manifest.json $(WORK)/index-minilm/manifest.json $(WORK)/eval-bm25/manifest.json
	$(RAGKIT) evaluate bm25=$(WORK)/mine minilm=$(WORK)/index-minilm minilm+bm25=$(WORK)/hybrid-minilm trained=$(WORK)/index hybrid=$(WORK)/hybrid --split dev --out $(WORK)/compare --overwrite

check:
	$(PYTHON) ../check.py expected.toml --work $(WORK) $(addprefix --stage ,$(STAGES))

clean:
	rm -rf $(WORK)
