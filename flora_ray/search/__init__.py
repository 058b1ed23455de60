"""Choosing subnets: per-block candidate filtering and the multi-objective search, without Ray.

``filtering`` scores each block's rank tuples with a local supernet; ``evaluator`` maps genes to rank
configurations and scores subnets with inherited weights.
"""
