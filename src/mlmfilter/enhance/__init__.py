"""Enhance instead of drop (AITQE): rewrite poor captions, re-score them, keep a rewrite only when it is better.

- :mod:`~mlmfilter.enhance.prompts`: every rewrite / describe / fuse prompt, configurable;
- :mod:`~mlmfilter.enhance.modes`: ``rewrite``, ``fuse`` and ``aitqe``: how candidates are written;
- :mod:`~mlmfilter.enhance.checks`: acceptance checks a candidate must pass before it is scored;
- :mod:`~mlmfilter.enhance.decide`: re-scoring with the judge, margin, best of several candidates;
- :mod:`~mlmfilter.enhance.stage`: the ``enhance`` stage of a run (one table per shard).
"""
