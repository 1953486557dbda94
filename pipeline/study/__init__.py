"""Studies: several method variants trained and evaluated with one protocol, compared in one table.

``spec`` reads and validates a study file, ``state`` remembers what is done, ``checks`` judges the results
(degenerate models, protocol sanity), ``table`` writes the comparison, ``run`` drives it all (``medrobust
study``).
"""
