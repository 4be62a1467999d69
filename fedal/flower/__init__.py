"""The Flower-facing corner of fedal: what crosses the network, defined once.

Only this subpackage (and ``clients/``, ``server/``) imports Flower; the core does not.
"""
