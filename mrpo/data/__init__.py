"""Data: the project's record format, the synthetic generator, readers of public data sets.

Record format (one JSON object per line in a JSONL file; image paths relative to the JSONL's folder
or absolute):
    {"id": str (stable), "image": str (path) | list[str] (several images, in order; [] = text-only),
     "problem": str, "solution": str (gold answer),
     "gold_reasoning": str ("" when unknown), "dataset": str, "split": "train" | "test",
     "answer_type": "closed" | "open", "facts": dict (synthetic data only, for the rule judge)}
"""
