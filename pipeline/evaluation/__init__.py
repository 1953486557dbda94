"""Robustness evaluation and reporting.

``metrics`` (classification scores, Dice), ``noise`` (white-noise baseline), ``robustness`` (the attack suite,
worst case per sample), ``results`` (metric names, tables, curves of a suite), ``curves`` (normalised area,
plots), ``margin`` (per-sample smallest breaking radius), ``stratified`` (metrics by metadata group),
``gradcam`` (Grad-CAM panels), ``artifacts`` (files written), ``loading`` (checkpoint -> model, sliding
window), ``run`` (``medrobust evaluate``), ``report`` (``medrobust report``).
"""
