"""Expert parallelism: the routed experts of every layer partitioned over E expert ranks, reached from the
attention ranks by all-to-all dispatch and combine (partition.py, exchange.py)."""
