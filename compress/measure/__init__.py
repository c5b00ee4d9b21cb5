"""What every stage's output is measured by: task metrics, size (raw and zipped), parameters,
non-zeros, bits per weight, MACs (``size``), and latency in every registered runtime (``latency``,
timed by ``compress.runtime``); ``row`` puts one report row together, ``config`` is the recipe's
``benchmark:`` section, ``machine`` the machine it was measured on.

Latency is always a *ratio to a baseline measured in the same process*: baseline and candidate
samples are interleaved (A B B A A B ...) so load from other processes hits both alike.
"""
