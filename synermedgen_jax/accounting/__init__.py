"""What a train step costs: analytic FLOPs (``flops``), analytic memory (``memory``) and the one reader of what
XLA compiled (``hlo``: cost and memory analyses, the optimised HLO text, the buffer live-range dump).

Used by ``plan``, ``bench``, the packing report and ``tools/model_flops.py``; nothing here allocates or runs a
step.
"""
