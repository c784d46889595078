"""The parts of the routing analysis (``python -m fairseq_moec.analyze``, see fairseq_moec/analyze.py):

- ``metrics``  pure computations on routing tensors (plain torch, no fairseq), checkable by hand, and the per-layer
  accumulator behind summary.json;
- ``plots``    the three pictures (matplotlib, Agg backend);
- ``report``   report.md.
"""
