"""Data side of the stack: input readers, the staged preprocessing pipeline that writes
Megatron indexed datasets, and the datasets training reads. The tokenizer
(``megatron_srp/tokenizer.py``) and the document and stage types
(``megatron_srp/documents.py``) sit below this package, at the root, because the classifiers
and interventions it runs use them too."""
