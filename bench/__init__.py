"""Benchmarks that measure the project against its reference side by side, in one command each.

`python -m bench train`    training to 99.0 / 99.5 % test accuracy, memory, inference throughput
                           (and, with --serve, the latency of the served champion);
`python -m bench pruning`  what the study's pruner saves over the same study without one.

Each writes a JSON record (with the machine it ran on) and a Markdown table for the README.
"""
