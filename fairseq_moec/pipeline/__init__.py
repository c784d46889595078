"""The data and evaluation pipeline of the demo, the study, the benchmarks, the WMT recipe scripts and the tests.

One implementation of each step that those tools share, so that they cannot drift apart:

- ``files``       line reading (plain, .xz, .gz), atomic outputs, stamps of resumable steps
- ``subwords``    sentencepiece training and encoding
- ``binarize``    raw text -> sentencepiece -> encoded text -> fairseq-preprocess
- ``hypotheses``  fairseq-generate output -> one hypothesis per input line, in input order; its speed line
- ``scores``      sacrebleu BLEU and chrF with their signatures
- ``logs``        fairseq ``--log-format json`` records
- ``machine``     the machine, its load and the exact code (git commit, dirty tree) behind a measurement
- ``small_model`` the sizes of the small Transformer that the demo, the study and the end-to-end benchmark train

Plain Python: no module here imports fairseq, and sentencepiece / sacrebleu are imported where they are used. The
plugin itself (``fairseq_moec/__init__.py``) does not import this package.
"""
