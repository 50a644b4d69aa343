"""Judging models: held-out evaluation of base and fine-tuned pipelines (``heldout``), the
DreamBench dataset (``dreambench``), the paper's metrics (``metrics``) and the run report
(``report``). Sits on ``toy`` (the toy world's oracle judges) and below."""
