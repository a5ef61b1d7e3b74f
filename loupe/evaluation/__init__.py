"""How well Loupe finds products, judged on shopper photos that training never made.

Training simulates its own shopper photos (``loupe.train.augment``); the evaluation simulators
live here, apart, and ``loupe.train`` never imports this package (``tests/unit/
test_architecture.py``), so that no model can score well by learning the simulator it is
judged by.
"""
