"""fedprune task package: experiments, data, partitions, models and plain train/eval loops.

Shared by the ServerApp and the ClientApp; imports neither.
"""
