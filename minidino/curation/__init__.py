"""DINOv2-style data curation (Oquab et al. 2023, arXiv 2304.07193, Sec. 3 and App. A) at small scale: a
tool around the method, not part of it. `python -m minidino.curation POOL ... --backbone RUN --out OUT`.

  curate.py          the pipeline and its command line: embed, deduplicate, decontaminate, retrieve, balance
  embedding.py       step 1: a pool's images described by a backbone or the copy descriptor, cached
  copy_detection.py  the copy descriptor (SSCD-style), trained on the pool itself
  similarity.py      exact nearest-neighbour search in blocks, connected components, (hierarchical) k-means
  report.py          report.json, report.md and its figures
  pools.py           messy test pools with known near-copies (benchmarks and tutorial 03)
"""
