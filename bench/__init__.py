"""postroom's benchmark suite: each figure beside a raw baseline measured in the same run.

Run it with ``python -m bench [relay|write|consumer|e2e|steady|all] [--quick] [--long]``.
Every run creates its own database and RabbitMQ vhost and drops them afterwards. Not
part of the test suite: the figures are noisy on shared cores, so only ratios against
the same run's baselines mean anything.
"""
