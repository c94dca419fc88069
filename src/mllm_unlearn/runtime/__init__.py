"""The bottom layer: nothing here imports the rest of the package.

- :mod:`.distributed`: several processes through ``accelerate`` (and nothing at all with one);
- :mod:`.batching`: seeding and endless, resumable mini-batch streams;
- :mod:`.outputs`: output folders that appear only when complete;
- :mod:`.options`: ``KEY=VALUE`` strings into a config dataclass, every bad value named.
- :mod:`.background`: one independent job in a second process (the demo's retrained oracle).
"""
