"""Run assembly, below both training and sampling: a workdir's recorded config
(``workdirs``) and the model, tokenizer and frozen weights a run is built from (``context``)."""
