"""Building blocks of the CIFAR-10 example (``examples/cifar10_se.py``).

Data loading and caching, batched augmentation, the tutorial's CNN, the training
engine, statistics and reporting. They use attnblocks' public API only.
"""
