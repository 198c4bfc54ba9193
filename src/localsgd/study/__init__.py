"""``localsgd study STUDY.yaml``: a grid of recipe variants, run one after another and
compared (see ``spec`` for the file, ``runner`` for the runs, ``table`` for the results)."""

from localsgd.study.runner import study_main

__all__ = ["study_main"]
